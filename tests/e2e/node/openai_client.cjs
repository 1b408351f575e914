// Drives a shardserve coordinator's HTTP API with the official OpenAI SDK for Node.js, as a user's
// program would, and prints what it got as one JSON object for tests/e2e/http_test.py to check.
//   node openai_client.cjs BASE_URL MODEL      (BASE_URL like http://127.0.0.1:8000/v1)
// The SDK comes from npm (package.json, package-lock.json beside this file); NODE_PATH points at
// the node_modules the test installed.
const { OpenAI } = require("openai");

async function main() {
  const [baseURL, model] = process.argv.slice(2);
  // No retries: a 429 or 503 must reach the test as it was sent.
  const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 60000 });
  const prompt = "Hello";
  const messages = [{ role: "user", content: "Hello" }];
  const fixed = { model, max_tokens: 12, temperature: 0, ignore_eos: true };
  const out = {};

  out.models = (await client.models.list()).data.map((m) => m.id);

  const completion = await client.completions.create({ ...fixed, prompt });
  out.completion = {
    object: completion.object,
    model: completion.model,
    text: completion.choices[0].text,
    finish_reason: completion.choices[0].finish_reason,
    usage: completion.usage,
  };

  let text = "";
  let chunks = 0;
  for await (const chunk of await client.completions.create({ ...fixed, prompt, stream: true })) {
    chunks += 1;
    text += chunk.choices[0]?.text ?? "";
  }
  out.completion_stream = { text, chunks };

  const chat = await client.chat.completions.create({ ...fixed, messages, logprobs: true, top_logprobs: 2 });
  out.chat = {
    object: chat.object,
    role: chat.choices[0].message.role,
    content: chat.choices[0].message.content,
    finish_reason: chat.choices[0].finish_reason,
    usage: chat.usage,
    logprobs: chat.choices[0].logprobs.content.length,
    top_logprobs: chat.choices[0].logprobs.content[0].top_logprobs.length,
  };

  // The SDK's own stream helper, which also checks the event order it expects.
  let content = "";
  let usage = null;
  let finish = null;
  const stream = await client.chat.completions.create({
    ...fixed,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    const choice = chunk.choices[0];
    if (!choice) continue;
    content += choice.delta?.content ?? "";
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  out.chat_stream = { content, usage, finish_reason: finish };

  out.errors = {};
  const attempts = {
    unknown_model: () => client.chat.completions.create({ ...fixed, model: "nope", messages }),
    n_2: () => client.chat.completions.create({ ...fixed, messages, n: 2 }),
    bad_temperature: () => client.completions.create({ ...fixed, prompt, temperature: -1 }),
  };
  for (const [name, attempt] of Object.entries(attempts)) {
    try {
      await attempt();
      out.errors[name] = { status: 200 };
    } catch (e) {
      out.errors[name] = { status: e.status, class: e.constructor.name, message: e.error?.message ?? String(e) };
    }
  }
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
