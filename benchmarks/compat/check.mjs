// The Vercel AI SDK against a running lockgate, started by run.py in front of fake upstreams.
// Prints one JSON line per check: {"name", "ok", "detail"}; exits 1 if any check failed.
import { createAnthropic } from "@ai-sdk/anthropic";
import { createOpenAI } from "@ai-sdk/openai";
import { APICallError, generateText, streamText, tool } from "ai";
import { z } from "zod";

const GATEWAY = process.env.LOCKGATE_URL;
const KEY = process.env.LOCKGATE_KEY;
const EXPECTED = process.env.LOCKGATE_EXPECTED_TEXT;
const CHECK_TIMEOUT_MS = 20000;

// Every URL the SDK posted to, so each check can prove which door it went through.
const posted = [];
const recordingFetch = (url, init) => {
  posted.push(new URL(url).pathname);
  return fetch(url, init);
};

const openai = createOpenAI({ baseURL: `${GATEWAY}/v1`, apiKey: KEY, fetch: recordingFetch });
const anthropic = createAnthropic({ baseURL: `${GATEWAY}/v1`, apiKey: KEY, fetch: recordingFetch });
const sendMail = tool({
  description: "Send an email",
  inputSchema: z.object({ to: z.string() }),
});
const sendMailThatRuns = tool({ ...sendMail, execute: async () => "sent" });

function expect(condition, message) {
  if (!condition) throw new Error(message);
}

function expectPosted(path) {
  expect(posted.length > 0 && posted.every((p) => p === path), `posted to ${JSON.stringify(posted)}, expected ${path}`);
}

function expectText(text, usage) {
  expect(text === EXPECTED, `text ${JSON.stringify(text)}`);
  expect(usage.inputTokens > 0 && usage.outputTokens > 0, `usage ${JSON.stringify(usage)}`);
  return `${JSON.stringify(text)}, tokens in/out ${usage.inputTokens}/${usage.outputTokens}`;
}

async function collect(stream) {
  let text = "";
  for await (const piece of stream) text += piece;
  return text;
}

// streamText reports failures through onError and ends the stream quietly; a check must see them.
function streamed(options) {
  const errors = [];
  const result = streamText({ ...options, maxRetries: 0, onError: ({ error }) => errors.push(error) });
  return { result, errors };
}

function expectNoStreamErrors(errors) {
  expect(errors.length === 0, `stream error: ${errors.map((e) => e?.message ?? String(e)).join("; ")}`);
}

async function generated(model, prompt) {
  const result = await generateText({ model, prompt, maxRetries: 0 });
  return expectText(result.text, result.usage);
}

async function streamedText(model, prompt) {
  const { result, errors } = streamed({ model, prompt });
  const text = await collect(result.textStream);
  expectNoStreamErrors(errors);
  return expectText(text, await result.usage);
}

function expectMailCall(calls, finishReason) {
  expect(calls.length === 1, `${calls.length} tool calls`);
  const [call] = calls;
  expect(call.toolName === "send_mail" && call.input?.to === "ann", `tool call ${JSON.stringify(call)}`);
  expect(finishReason === "tool-calls", `finishReason ${finishReason}`);
  return `send_mail(${JSON.stringify(call.input)}), finishReason ${finishReason}`;
}

async function unauthorized(model) {
  try {
    await generateText({ model, prompt: "hi", maxRetries: 0 });
  } catch (error) {
    expect(APICallError.isInstance(error), `raised ${error?.name}: ${error?.message}`);
    expect(error.statusCode === 401, `status ${error.statusCode}`);
    return `APICallError ${error.statusCode}: ${error.message}`;
  }
  throw new Error("no error raised");
}

const checks = {
  "responses generateText": async () => {
    const detail = await generated(openai("chat-default"), "hi");
    expectPosted("/v1/responses");
    return detail;
  },
  "responses streamText": async () => {
    const detail = await streamedText(openai("chat-default"), "hi");
    expectPosted("/v1/responses");
    return detail;
  },
  "responses tool call (generateText)": async () => {
    const result = await generateText({ model: openai("chat-tools"), prompt: "mail ann", tools: { send_mail: sendMail }, maxRetries: 0 });
    expectPosted("/v1/responses");
    return expectMailCall(result.toolCalls, result.finishReason);
  },
  "responses tool call (streamText)": async () => {
    const { result, errors } = streamed({ model: openai("chat-tools"), prompt: "mail ann", tools: { send_mail: sendMail } });
    const parts = [];
    for await (const part of result.fullStream) parts.push(part.type);
    expectNoStreamErrors(errors);
    expect(parts.includes("tool-input-delta"), `no tool-input-delta among ${parts.join(",")}`);
    expectPosted("/v1/responses");
    return expectMailCall(await result.toolCalls, await result.finishReason);
  },
  "responses tool round trip": async () => {
    const tools = { send_mail: sendMailThatRuns };
    const messages = [{ role: "user", content: "mail ann" }];
    const first = await generateText({ model: openai("chat-tools"), messages, tools, maxRetries: 0 });
    expectMailCall(first.toolCalls, first.finishReason);
    expect(first.toolResults[0]?.output === "sent", `tool results ${JSON.stringify(first.toolResults)}`);
    const second = await generateText({ model: openai("chat-default"), messages: [...messages, ...first.response.messages], tools, maxRetries: 0 });
    expectPosted("/v1/responses");
    return `function_call + function_call_output sent back, then ${expectText(second.text, second.usage)}`;
  },
  // Unless told `store: false`, the SDK sends an earlier answer's text back as a reference to its stored item,
  // which a stateless gateway cannot resolve: it must say so, and the same history with `store: false` must work.
  "responses multi-turn, default store -> 400": async () => {
    const history = await twoTurnHistory({});
    try {
      await generateText({ model: openai("chat-default"), messages: history, maxRetries: 0 });
    } catch (error) {
      expect(APICallError.isInstance(error) && error.statusCode === 400, `raised ${error?.name} ${error?.statusCode}: ${error?.message}`);
      expect(error.requestBodyValues?.input?.some((item) => item.type === "item_reference"), "no item_reference was sent");
      expect(error.message.includes("store: false"), `the message does not name the fix: ${error.message}`);
      return `APICallError 400: ${error.message}`;
    }
    throw new Error("the gateway answered a reference to an item it never stored");
  },
  "responses multi-turn, store: false": async () => {
    const providerOptions = { openai: { store: false } };
    const history = await twoTurnHistory(providerOptions);
    const second = await generateText({ model: openai("chat-default"), messages: history, providerOptions, maxRetries: 0 });
    expectPosted("/v1/responses");
    return `second turn: ${expectText(second.text, second.usage)}`;
  },
  "responses wrong key -> 401": async () => {
    const bad = createOpenAI({ baseURL: `${GATEWAY}/v1`, apiKey: "lg-wrong-key-000000", fetch: recordingFetch });
    const detail = await unauthorized(bad("chat-default"));
    expectPosted("/v1/responses");
    return detail;
  },
  "chat generateText": async () => {
    const detail = await generated(openai.chat("chat-default"), "hi");
    expectPosted("/v1/chat/completions");
    return detail;
  },
  "chat streamText": async () => {
    const detail = await streamedText(openai.chat("chat-default"), "hi");
    expectPosted("/v1/chat/completions");
    return detail;
  },
  "anthropic generateText": async () => {
    const detail = await generated(anthropic("chat-default"), "hi");
    expectPosted("/v1/messages");
    return detail;
  },
  "anthropic streamText": async () => {
    const detail = await streamedText(anthropic("chat-default"), "hi");
    expectPosted("/v1/messages");
    return detail;
  },
  "anthropic tool call": async () => {
    const result = await generateText({ model: anthropic("chat-tools"), prompt: "mail ann", tools: { send_mail: sendMail }, maxRetries: 0 });
    expectPosted("/v1/messages");
    return expectMailCall(result.toolCalls, result.finishReason);
  },
  "anthropic wrong key -> 401": async () => {
    const bad = createAnthropic({ baseURL: `${GATEWAY}/v1`, apiKey: "lg-wrong-key-000000", fetch: recordingFetch });
    const detail = await unauthorized(bad("chat-default"));
    expectPosted("/v1/messages");
    return detail;
  },
};

async function twoTurnHistory(providerOptions) {
  const messages = [{ role: "user", content: "hi" }];
  const first = await generateText({ model: openai("chat-default"), messages, providerOptions, maxRetries: 0 });
  return [...messages, ...first.response.messages, { role: "user", content: "and again" }];
}

function withTimeout(promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer in ${CHECK_TIMEOUT_MS} ms`)), CHECK_TIMEOUT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

let failed = 0;
for (const [name, check] of Object.entries(checks)) {
  posted.length = 0;
  try {
    const detail = await withTimeout(check());
    console.log(JSON.stringify({ name, ok: true, detail }));
  } catch (error) {
    failed += 1;
    console.log(JSON.stringify({ name, ok: false, detail: error?.message ?? String(error) }));
  }
}
process.exit(failed ? 1 : 0);
