#!/usr/bin/env node
// Calls the embedder gRPC service from Node.js with nothing but the .proto: @grpc/proto-loader reads
// protos/embedder/v1/embedder.proto at run time, @grpc/grpc-js makes the calls. No generated code.
//
//   npm ci && node client.js 127.0.0.1:50051 IMAGES_DIR
//
// IMAGES_DIR holds one folder per label (IMAGES_DIR/cat/1.jpg, IMAGES_DIR/dog/7.png, ...). The script embeds
// every image (Embed), stores them with their labels in a collection (Add), searches it with the first image
// (Search), trains a logistic-regression head on it (Train), and predicts the first image of each label
// (Predict). It prints one JSON object with every result to stdout; a failed call exits 1 with its gRPC status.
// EMBEDDER_TOKEN is sent as the bearer token when set; EMBEDDER_PROTO overrides where the .proto is.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = process.env.EMBEDDER_PROTO ||
  path.resolve(__dirname, "..", "..", "..", "protos", "embedder", "v1", "embedder.proto");
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024; // the server's default limit, both ways
const COLLECTION = "node-interop";
const OK = 0;

function loadService() {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, // field names exactly as in the .proto (model_id, not modelId)
    longs: Number,
    enums: String,
    defaults: true, // unset scalars come back as their proto3 defaults, as in every other language
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).embedder.v1.Embedder;
}

// Packed little-endian float32 (Result.vector) -> plain numbers.
function floats(buffer) {
  const out = new Array(buffer.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = buffer.readFloatLE(4 * i);
  return out;
}

// [{id, label, image}] from IMAGES_DIR/<label>/<file>, in sorted order so every run sends the same requests.
function readImages(dir) {
  const items = [];
  for (const label of fs.readdirSync(dir).sort()) {
    const folder = path.join(dir, label);
    if (!fs.statSync(folder).isDirectory()) continue;
    for (const file of fs.readdirSync(folder).sort()) {
      items.push({ id: `${label}/${file}`, label, image: fs.readFileSync(path.join(folder, file)) });
    }
  }
  if (items.length === 0) throw new Error(`no images under ${dir}; expected ${dir}/<label>/<image file>`);
  return items;
}

// A unary call as a promise; a non-OK status rejects with "METHOD: CODE_NAME: details".
function unary(client, metadata, method, request, timeoutSeconds = 60) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutSeconds * 1000);
    client[method](request, metadata, { deadline }, (err, response) => {
      if (err) reject(new Error(`${method}: ${grpc.status[err.code]}: ${err.details}`));
      else resolve(response);
    });
  });
}

function itemError(status) {
  return status && status.code !== OK ? `${grpc.status[status.code]}: ${status.message}` : null;
}

async function main() {
  const [target, imagesDir] = process.argv.slice(2);
  if (!target || !imagesDir) {
    console.error("usage: node client.js HOST:PORT IMAGES_DIR   (IMAGES_DIR/<label>/<image file>)");
    process.exit(2);
  }
  const Embedder = loadService();
  const client = new Embedder(target, grpc.credentials.createInsecure(), {
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
  });
  const metadata = new grpc.Metadata();
  if (process.env.EMBEDDER_TOKEN) metadata.set("authorization", `Bearer ${process.env.EMBEDDER_TOKEN}`);
  const call = (method, request, timeoutSeconds) => unary(client, metadata, method, request, timeoutSeconds);
  const items = readImages(imagesDir);

  const embedded = await call("Embed", { items: items.map(({ id, image }) => ({ id, image })) });
  const embed = {
    model_id: embedded.model_id,
    dim: embedded.dim,
    results: embedded.results.map((r) => ({ id: r.id, error: itemError(r.status), vector: floats(r.vector) })),
  };

  const added = await call("Add", {
    collection: COLLECTION,
    items: items.map(({ id, label, image }) => ({ item: { id, image }, label })),
  });
  const add = { added: added.added, replaced: added.replaced, errors: added.results.map((r) => itemError(r.status)) };

  const found = await call("Search", { collection: COLLECTION, item: { id: "query", image: items[0].image }, k: 3 });
  const search = {
    query: items[0].id,
    hits: found.hits.map((h) => ({ id: h.id, score: h.score, label: h.label })),
  };

  const trained = await call("Train", { collection: COLLECTION, head: "logreg", seed: 0 }, 300);
  const train = {
    head_id: trained.head.head_id,
    classes: trained.head.classes,
    samples: trained.samples,
    metrics: JSON.parse(trained.head.metrics_json || "{}"),
  };

  const firstOfEach = items.filter((it, i) => i === 0 || items[i - 1].label !== it.label); // sorted by label
  const predicted = await call("Predict", {
    head_id: train.head_id,
    items: firstOfEach.map(({ id, image }) => ({ id, image })),
    top_k: 1,
  });
  const predict = predicted.predictions.map((p) => ({
    id: p.id,
    error: itemError(p.status),
    label: p.top.length ? p.top[0].label : null,
    probability: p.top.length ? p.top[0].probability : null,
  }));

  client.close();
  process.stdout.write(JSON.stringify({ embed, add, search, train, predict }) + "\n");
}

main().catch((err) => {
  console.error(err.message);
  process.exit(1);
});
