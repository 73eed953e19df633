"""Code that nodes, the coordinator and clients all import: slots, errors, etcd keys."""
