// Calls the Mesh cache from Node.js: Set a key with a TTL, Get it back, then show how a
// rejected call reports the bad field. Usage: node cache_example.js [address] [key] [value]
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.join(__dirname, '..', '..', 'protos');
const LOAD_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const DEADLINE_MS = 5000;

const address = process.argv[2] || process.env.MESH_NODE || '127.0.0.1:50051';
const key = process.argv[3] || 'hello-from-node';
const value = process.argv[4] || 'hi';

// The googleapis files the protos import for their HTTP rules (google/api/annotations.proto),
// copied there from the googleapis-common-protos package by `make generate`.
const GOOGLEAPIS = path.join(__dirname, '..', '..', 'generated', 'protos');

// Load the contract straight from the .proto (no code generation). The
// google/protobuf well-known types it imports (Duration, Timestamp) ship with proto-loader.
const packageDefinition = protoLoader.loadSync(path.join(PROTOS, 'mesh/cache/v1/cache.proto'),
  { ...LOAD_OPTIONS, includeDirs: [PROTOS, GOOGLEAPIS] });
const { CacheService } = grpc.loadPackageDefinition(packageDefinition).mesh.cache.v1;

// Error details travel in the `grpc-status-details-bin` trailer as a google.rpc.Status.
// These are the few messages of google/rpc/{status,error_details}.proto we need to read it.
const rpcTypes = protoLoader.fromJSON({ nested: { google: { nested: {
  protobuf: { nested: { Any: { fields: {
    type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } } } },
  rpc: { nested: {
    Status: { fields: { code: { type: 'int32', id: 1 }, message: { type: 'string', id: 2 },
      details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 } } },
    BadRequest: { fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
      nested: { FieldViolation: { fields: {
        field: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } } } } },
  } },
} } } }, LOAD_OPTIONS);

/** The field violations (BadRequest details) carried by a failed call, if any. */
function fieldViolations(err) {
  const [raw] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw) return [];
  const status = rpcTypes['google.rpc.Status'].deserialize(raw);
  return status.details
    .filter((any) => any.type_url.endsWith('/google.rpc.BadRequest'))
    .flatMap((any) => rpcTypes['google.rpc.BadRequest'].deserialize(any.value).field_violations);
}

/** A unary call as a promise, always with a deadline. */
function call(client, method, request) {
  const deadline = new Date(Date.now() + DEADLINE_MS);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (err, response) => {
      if (err) reject(err); else resolve(response);
    });
  });
}

async function main() {
  const client = new CacheService(address, grpc.credentials.createInsecure());
  try {
    // bytes fields take a Buffer; a Duration is {seconds, nanos}; uint64 comes back as a string.
    await call(client, 'Set', { key, value: Buffer.from(value, 'utf8'), ttl: { seconds: 60 } });
    const got = await call(client, 'Get', { key });
    console.log(JSON.stringify({
      key, value: got.value.toString('utf8'), version: got.version, found: got.found,
    }));

    // Bad input fails with INVALID_ARGUMENT, and the details name the offending field.
    try {
      await call(client, 'Set', { key: '', value: Buffer.from(value, 'utf8') });
      throw new Error('a Set with an empty key was accepted');
    } catch (err) {
      if (err.code !== grpc.status.INVALID_ARGUMENT) throw err;
      const fields = fieldViolations(err).map((v) => `${v.field}: ${v.description}`);
      console.error(`expected error: ${grpc.status[err.code]} "${err.details}"`
        + ` field violations: ${JSON.stringify(fields)}`);
    }
  } finally {
    client.close();
  }
}

main().catch((err) => {
  // gRPC errors carry a numeric code and the server's details message.
  const code = err.code === undefined ? 'ERROR' : `${grpc.status[err.code]} (${err.code})`;
  console.error(`error: ${code}: ${err.details || err.message}`);
  process.exitCode = 1;
});
