#!/usr/bin/env node
// Stream pagedserve.v1.Inference/Generate from Node.js (@grpc/grpc-js + @grpc/proto-loader).
//
// usage: node client.js TARGET API_KEY REQUEST_JSON
//   TARGET       host:port, e.g. localhost:50051 (plaintext)
//   API_KEY      sent as `authorization: Bearer <key>`; pass "" to send no authorization
//   REQUEST_JSON a GenerateRequest in JSON, field names as in the .proto, e.g.
//                '{"text": "Hello", "max_tokens": 16, "temperature": 0}'
//
// Prints one JSON line per received GenerateResponse ({"message": {...}}), then one line
// {"status": {"code": N, "name": "OK", "details": "..."}}. Exits 0 on OK; otherwise prints
// the gRPC code name on stderr and exits 1 (2 for bad usage).
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");
const PROTO_FILE = "pagedserve/v1/inference.proto";

function usage(msg) {
  process.stderr.write(`${msg}\nusage: node client.js TARGET API_KEY REQUEST_JSON\n`);
  process.exit(2);
}

function codeName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) || `UNKNOWN_CODE_${code}`;
}

function main() {
  const [target, apiKey, requestJson] = process.argv.slice(2);
  if (target === undefined || apiKey === undefined || requestJson === undefined) {
    usage("missing arguments");
  }
  let request;
  try {
    request = JSON.parse(requestJson);
  } catch (e) {
    usage(`REQUEST_JSON is not JSON: ${e.message}`);
  }

  const def = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String, // uint64 seed round-trips as a decimal string
    enums: String, // finish_reason as its name, e.g. "LENGTH"
    defaults: true, // zero-valued fields (e.g. cached_tokens: 0) are present
    oneofs: true, // sets `kind: "delta" | "final"` on each response
  });
  const pkg = grpc.loadPackageDefinition(def);
  const client = new pkg.pagedserve.v1.Inference(target, grpc.credentials.createInsecure());

  const md = new grpc.Metadata();
  if (apiKey !== "") md.set("authorization", `Bearer ${apiKey}`);

  const deadline = new Date(Date.now() + 120 * 1000);
  const call = client.Generate(request, md, { deadline });
  call.on("data", (msg) => {
    process.stdout.write(JSON.stringify({ message: msg }) + "\n");
  });
  // 'status' comes after the last 'data' (and after 'error' on failure); 'error' alone would
  // otherwise be an unhandled event, so listen to it and report everything from 'status'.
  call.on("error", () => {});
  call.on("status", (st) => {
    const name = codeName(st.code);
    process.stdout.write(
      JSON.stringify({ status: { code: st.code, name, details: st.details } }) + "\n",
    );
    client.close();
    if (st.code !== grpc.status.OK) {
      process.stderr.write(`${name}: ${st.details}\n`);
      process.exitCode = 1;
    }
  });
}

main();
