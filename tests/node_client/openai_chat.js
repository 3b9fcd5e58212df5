// Streams one chat completion from pagedserve's OpenAI-compatible HTTP API with the official
// `openai` npm package, for tests/test_openai_api.py.
//
//   node openai_chat.js BASE_URL API_KEY REQUEST_JSON
//
// Prints one JSON object: {"chunks": [every chunk as received], "error": null} or, when the
// call fails, {"chunks": [...], "error": {"status", "name", "message"}}.
const OpenAI = require("openai");

async function main() {
  const [baseURL, apiKey, request] = process.argv.slice(2);
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
  const out = { chunks: [], error: null };
  try {
    const stream = await client.chat.completions.create({ ...JSON.parse(request), stream: true });
    for await (const chunk of stream) out.chunks.push(chunk);
  } catch (e) {
    out.error = { status: e.status ?? null, name: e.constructor.name, message: String(e.message) };
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main();
