"""The Mesh node: one grpc.aio server hosting the services, registered in etcd."""
