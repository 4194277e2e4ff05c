// The lockgate console. Everything shown is set as text (textContent, text nodes): nothing a model, a user or the
// policy says is ever parsed as HTML. The key lives in this tab's sessionStorage and goes only in Authorization.
"use strict";

(() => {
  const KEY_STORE = "lockgate.console.key";
  const MAX_PANELS = 3;
  const MAX_EVENT_CHARS = 1 << 20;
  const $ = (id) => document.getElementById(id);
  const state = { key: null, me: null, routes: [], panels: [], comparing: false, charts: [], sending: false };
  let panelsMade = 0;

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    node.append(...children);
    return node;
  }

  const count = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));
  const ms = (n) => (n === null || n === undefined ? "—" : `${Math.round(n).toLocaleString("en-US")} ms`);
  const usd = (n) => (n === null || n === undefined ? "—" : `$${Number(n).toFixed(n >= 1 ? 2 : 6)}`);
  const UNITS = [[86400, "day"], [3600, "hour"], [60, "minute"], [1, "second"]];
  const per = (seconds) => {
    const [size, unit] = UNITS.find(([s]) => seconds % s === 0) || [1, "second"];
    return seconds === size ? unit : `${seconds / size} ${unit}s`;
  };
  const utc = (iso) => `${new Date(iso).toISOString().slice(0, 16).replace("T", " ")} UTC`;
  const duration = (seconds) => {
    const s = Math.ceil(seconds);
    if (s < 120) return `${s} s`;
    if (s < 7200) return `${Math.round(s / 60)} min`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  };

  class ApiError extends Error {
    constructor(status, body, headers) {
      super(body?.error?.message || `The gateway answered ${status}.`);
      this.status = status;
      this.code = body?.error?.code || null;
      this.headers = headers;
    }
  }

  function authorization() {
    return { Authorization: `Bearer ${state.key}` };
  }

  async function api(path) {
    const response = await fetch(path, { headers: authorization(), cache: "no-store" });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const error = new ApiError(response.status, body, response.headers);
      if (response.status === 401 && state.me) signOut(`The gateway no longer accepts this key: ${error.message}`);
      throw error;
    }
    return body;
  }

  // What a refusal is, in the caller's words: a rate limit, a budget, a guardrail, a permission, or a failure.
  function describe(status, error, headers) {
    const code = error?.code || null;
    const message = error?.message || (status ? `The gateway answered ${status}.` : "The stream failed.");
    if (status === 429 || code === "rate_limit_exceeded" || code === "budget_exceeded") {
      const retry = headers?.get("retry-after");
      const title = code === "budget_exceeded" ? "Budget exhausted (429)" : "Rate limited (429)";
      const detail = retry && !/retry after/i.test(message) ? `${message} Retry after ${retry} s.` : message;
      return { kind: "limited", title, detail };
    }
    if (code === "content_policy_violation") {
      return { kind: "blocked", title: `Blocked by a guardrail${status ? ` (${status})` : ""}`, detail: message };
    }
    if (status === 403) return { kind: "blocked", title: "Not allowed (403)", detail: message };
    const label = [status, code].filter(Boolean).join(", ");
    return { kind: "failed", title: label ? `Failed (${label})` : "Failed", detail: message };
  }

  // Server-sent events of one response, each event's data as one string.
  async function* sseData(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        let end;
        while ((end = /\r?\n\r?\n/.exec(buffer)) !== null) {
          const block = buffer.slice(0, end.index);
          buffer = buffer.slice(end.index + end[0].length);
          const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
          if (data) yield data;
        }
        if (buffer.length > MAX_EVENT_CHARS) throw new Error("an event of the stream is larger than 1 MB");
      }
    } finally {
      reader.releaseLock();
    }
  }

  function cost(model, usage) {
    const price = state.me.prices[model];
    if (!price || !usage) return null;
    const details = usage.prompt_tokens_details || {};
    const cached = details.cached_tokens || 0;
    const written = details.cache_write_tokens || 0;
    const written1h = details.cache_write_1h_tokens || 0;
    return ((usage.prompt_tokens - cached - written) * price.input + cached * price.cached_input
      + (written - written1h) * price.cache_write + written1h * price.cache_write_1h
      + usage.completion_tokens * price.output) / 1e6;
  }

  // ---- Playground and Compare ----

  function makePanel() {
    const select = el("select", { id: `route-${panelsMade++}`, class: "route" });
    for (const route of state.routes) select.append(el("option", { value: route }, route));
    select.selectedIndex = Math.min(state.panels.length, Math.max(state.routes.length - 1, 0));
    const remove = el("button", { type: "button", class: "quiet", title: "Remove this route" }, "Remove");
    const answer = el("div", { class: "answer", "data-role": "answer" });
    const outcome = el("div", { class: "outcome", "data-role": "outcome", hidden: "" });
    const values = {};
    const figures = el("dl", { class: "figures", "data-role": "figures" });
    for (const [name, label] of [["tokens", "Tokens in / out"], ["latency", "Latency"], ["ttft", "First token"],
      ["cost", "Cost"]]) {
      values[name] = el("dd", { "data-figure": name }, "—");
      figures.append(el("div", {}, el("dt", {}, label), values[name]));
    }
    const node = el("article", { class: "card panel", "data-role": "panel" },
      el("div", { class: "head" }, el("label", { for: select.id }, "Route"), select, remove), answer, outcome, figures);
    const panel = {
      node, select, answer, outcome, values, remove,
      reset() {
        answer.replaceChildren();
        outcome.replaceChildren();
        outcome.hidden = true;
        for (const value of Object.values(values)) value.textContent = "—";
        node.removeAttribute("data-state");
      },
      write(kind, text) {
        if (kind === "content") {
          const last = answer.lastChild;
          if (last && last.nodeType === Node.TEXT_NODE) last.appendData(text);
          else answer.append(text);
          return;
        }
        const last = answer.lastElementChild;
        if (last && last === answer.lastChild && last.className === kind) last.append(text);
        else answer.append(el("span", { class: kind }, text));
      },
      show(what) {
        outcome.className = `outcome ${what.kind}`;
        outcome.replaceChildren(el("strong", {}, what.title), what.detail);
        outcome.hidden = false;
        node.setAttribute("data-state", what.kind);
      },
    };
    remove.addEventListener("click", () => {
      if (state.panels.length <= 2 || state.sending) return;
      state.panels.splice(state.panels.indexOf(panel), 1);
      node.remove();
      layoutPanels();
    });
    return panel;
  }

  function layoutPanels() {
    const wanted = state.comparing ? Math.max(state.panels.length, 2) : 1;
    while (state.panels.length < wanted) {
      const panel = makePanel();
      state.panels.push(panel);
      $("panels").append(panel.node);
    }
    while (state.panels.length > wanted) state.panels.pop().node.remove();
    for (const panel of state.panels) panel.remove.hidden = !state.comparing || state.panels.length <= 2;
    $("compare").setAttribute("aria-pressed", String(state.comparing));
    $("add-route").hidden = !state.comparing || state.panels.length >= MAX_PANELS;
    $("send").disabled = state.sending || state.routes.length === 0;
  }

  async function run(panel, messages, settings) {
    panel.reset();
    const route = panel.select.value;
    const started = performance.now();
    let firstAt = null;
    let usage = null;
    let model = null;
    const finish = () => {
      panel.values.latency.textContent = ms(performance.now() - started);
      panel.values.ttft.textContent = firstAt === null ? "—" : ms(firstAt - started);
      if (usage) {
        panel.values.tokens.textContent = `${count(usage.prompt_tokens)} / ${count(usage.completion_tokens)}`;
        const spent = cost(model, usage);
        panel.values.cost.textContent = spent === null ? "no price" : usd(spent);
      }
    };
    let response;
    try {
      response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { ...authorization(), "Content-Type": "application/json" },
        body: JSON.stringify({ model: route, messages, stream: true, stream_options: { include_usage: true }, ...settings }),
      });
    } catch (error) {
      panel.show({ kind: "failed", title: "The gateway cannot be reached", detail: String(error) });
      return;
    }
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      panel.show(describe(response.status, body?.error, response.headers));
      finish();
      if (response.status === 401) signOut(`The gateway no longer accepts this key: ${body?.error?.message || ""}`);
      return;
    }
    try {
      for await (const data of sseData(response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          panel.show(describe(null, chunk.error, null));
          break;
        }
        model = chunk.model || model;
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          for (const [field, kind] of [["reasoning_content", "reasoning"], ["content", "content"], ["refusal", "refusal"]]) {
            const text = delta[field];
            if (typeof text !== "string" || text === "") continue;
            if (firstAt === null) {
              firstAt = performance.now();
              panel.values.ttft.textContent = ms(firstAt - started);
            }
            panel.write(kind, text);
          }
          if (choice.finish_reason === "content_filter") {
            panel.show({ kind: "blocked", title: "Stopped by a content filter", detail: "The answer was cut short." });
          }
        }
      }
    } catch (error) {
      panel.show({ kind: "failed", title: "The stream broke off", detail: String(error.message || error) });
    }
    finish();
    if (!panel.node.hasAttribute("data-state")) panel.node.setAttribute("data-state", "done");
  }

  async function send(event) {
    event.preventDefault();
    const text = $("message").value;
    if (!text.trim() || state.sending) return;
    const messages = [];
    const system = $("system-prompt").value;
    if (system.trim()) messages.push({ role: "system", content: system });
    messages.push({ role: "user", content: text });
    const settings = {};
    const temperature = Number.parseFloat($("temperature").value);
    if (Number.isFinite(temperature)) settings.temperature = temperature;
    const maxTokens = Number.parseInt($("max-tokens").value, 10);
    if (Number.isFinite(maxTokens)) settings.max_tokens = maxTokens;
    state.sending = true;
    layoutPanels();
    try {
      await Promise.all(state.panels.map((panel) => run(panel, messages, settings)));
    } finally {
      state.sending = false;
      layoutPanels();
    }
  }

  // ---- Usage ----

  function chart(target, series, data, format = count) {
    const width = Math.max(target.clientWidth, 280);
    const options = {
      width, height: 170,
      scales: { x: { time: true } },
      legend: { show: true },
      series: [{}, ...series.map(([label, stroke]) => ({
        label, stroke, width: 1.5, spanGaps: false, points: { size: 4 }, value: (u, v) => format(v),
      }))],
      axes: [{}, { size: 70, values: (u, splits) => splits.map(format) }],
    };
    target.replaceChildren();
    state.charts.push(new uPlot(options, data, target));
  }

  function table(title, id, rows) {
    const columns = [["name", "", null], ["requests", "requests", count], ["errors", "errors", count],
      ["rate_limited", "rate-limited", count], ["blocked", "blocked", count], ["prompt_tokens", "tokens in", count],
      ["completion_tokens", "tokens out", count], ["cost_usd", "cost", usd], ["p50_ms", "p50", ms],
      ["p99_ms", "p99", ms]];
    const head = el("tr", {}, el("th", {}, title), ...columns.slice(1).map(([, label]) => el("th", { class: "num" }, label)));
    const body = el("tbody");
    for (const row of rows) {
      body.append(el("tr", {}, el("td", {}, row.name || "(none)"),
        ...columns.slice(1).map(([name, , format]) => el("td", { class: "num" }, format(row[name])))));
    }
    if (!rows.length) body.append(el("tr", {}, el("td", { class: "empty", colspan: String(columns.length) }, "No requests.")));
    return el("div", { class: "card" }, el("table", { id }, el("thead", {}, head), body));
  }

  async function loadUsage() {
    $("usage-error").textContent = "";
    const query = new URLSearchParams({ since: $("usage-range").value });
    const user = $("usage-user").value.trim();
    if (state.me.admin && user) query.set("user", user);
    let report;
    try {
      report = await api(`/console/api/usage?${query}`);
    } catch (error) {
      $("usage-error").textContent = error.message;
      return;
    }
    $("usage-scope").textContent = report.user === null ? "Everyone's requests (admin)" : `Requests of ${report.user}`;
    const totals = report.totals;
    $("usage-totals").replaceChildren(...[
      ["Requests", count(totals.requests)], ["Errors", count(totals.errors)], ["Rate-limited", count(totals.rate_limited)],
      ["Blocked", count(totals.blocked)], ["Tokens in", count(totals.prompt_tokens)],
      ["Tokens out", count(totals.completion_tokens)], ["Cost", usd(totals.cost_usd)], ["p50", ms(totals.p50_ms)],
      ["p99", ms(totals.p99_ms)],
    ].map(([label, value]) => el("div", { class: "total" }, el("div", { class: "label" }, label),
      el("div", { class: "value" }, value))));
    for (const old of state.charts.splice(0)) old.destroy();
    const s = report.series;
    chart($("chart-requests"), [["requests", "#2f5bd3"], ["errors", "#b42318"]], [s.t, s.requests, s.errors]);
    chart($("chart-tokens"), [["in", "#2f5bd3"], ["out", "#12a594"]], [s.t, s.prompt_tokens, s.completion_tokens]);
    chart($("chart-cost"), [["USD", "#a15c07"]], [s.t, s.cost_usd], (v) => (v === null ? "—" : `$${+v.toPrecision(2)}`));
    chart($("chart-latency"), [["p50", "#2f5bd3"], ["p99", "#b42318"]], [s.t, s.p50_ms, s.p99_ms], ms);
    $("usage-tables").replaceChildren(
      el("h2", {}, "By route"), table("route", "usage-by-route", report.by_route),
      el("h2", {}, "By model"), table("provider/model", "usage-by-model", report.by_model),
      el("h2", {}, "By user"), table("user", "usage-by-user", report.by_user));
  }

  // ---- Governance ----

  function limitRows(limits) {
    const rows = [];
    for (const scope of limits) {
      if (scope.error) {
        rows.push([scope.scope, "unknown", "", "", "", "", scope.error]);
        continue;
      }
      for (const w of scope.windows) {
        rows.push([scope.scope, `${w.kind} per ${per(w.window_s)}`, w.routes.join(", "), count(w.limit), count(w.used),
          count(w.remaining), w.reset_s > 0 ? `clear in ${duration(w.reset_s)}` : "clear"]);
      }
      for (const p of scope.parallel) {
        rows.push([scope.scope, "requests at once", p.routes.join(", "), count(p.limit), count(p.in_use),
          count(Math.max(p.limit - p.in_use, 0)), ""]);
      }
      for (const b of scope.budgets) {
        const held = b.reserved_usd > 0 ? ` (+${usd(b.reserved_usd)} held)` : "";
        rows.push([scope.scope, `USD per ${b.per}`, "*", usd(b.usd), `${usd(b.spent_usd)}${held}`,
          usd(Math.max(b.usd - b.spent_usd - b.reserved_usd, 0)), `resets ${utc(b.resets_at)}`]);
      }
    }
    return rows;
  }

  function plainTable(id, headers, rows, empty) {
    const body = el("tbody");
    for (const row of rows) body.append(el("tr", {}, ...row.map((cell) => el("td", {}, String(cell)))));
    if (!rows.length) body.append(el("tr", {}, el("td", { class: "empty", colspan: String(headers.length) }, empty)));
    return el("div", { class: "card" },
      el("table", { id }, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))), body));
  }

  async function loadGovernance() {
    $("governance-error").textContent = "";
    $("governance-body").replaceChildren();
    let report;
    try {
      report = await api("/console/api/governance?since=24h");
    } catch (error) {
      $("governance-error").textContent = error.status === 403
        ? `The gateway refused: ${error.message} (403 ${error.code})` : error.message;
      return;
    }
    const explained = el("div", { class: "explain", id: "governance-explain" },
      ...report.explained.map((entry) => el("div", { class: "card" }, el("pre", {}, entry.text))));
    const shown = report.explained.length < report.users ? ` (the first ${report.explained.length} of ${report.users})` : "";
    const findings = report.findings === null
      ? el("p", { class: "error" }, report.findings_error)
      : plainTable("governance-findings", ["direction", "type", "action", "findings", "requests"],
        report.findings.map((f) => [f.direction, f.entity, f.action, count(f.findings), count(f.requests)]),
        "No guardrail finding in the last 24 hours.");
    $("governance-body").replaceChildren(
      el("p", { class: "hint" }, `Policy ${report.policy_version}, figures as of ${utc(report.checked_at)}`),
      el("h2", {}, `Who may call what, and why${shown}`),
      el("p", { class: "hint" }, "What lockgate check --explain USER prints for each user."), explained,
      el("h2", {}, "Limits and budgets, with what remains now"),
      plainTable("governance-limits", ["scope", "limit", "routes", "allowed", "used", "remaining", "window"],
        limitRows(report.limits), "No limit or budget in the policy."),
      el("h2", {}, "Guardrail findings by type, last 24 hours"), findings);
  }

  // ---- Sign-in and views ----

  function show(view) {
    for (const section of document.querySelectorAll("main > .view")) section.hidden = section.id !== `view-${view}`;
    for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("current", link.dataset.view === view);
  }

  function route() {
    if (!state.me) {
      show("signin");
      return;
    }
    const view = location.hash.slice(1) || "playground";
    if (view === "usage") {
      show("usage");
      loadUsage();
    } else if (view === "governance") {
      show("governance");
      loadGovernance();
    } else {
      show("playground");
    }
  }

  async function signIn(key) {
    state.key = key;
    try {
      const me = await api("/console/api/me");
      const models = await api("/v1/models");
      state.me = me;
      state.routes = models.data.map((entry) => entry.id);
    } catch (error) {
      state.key = null;
      sessionStorage.removeItem(KEY_STORE);
      throw error;
    }
    sessionStorage.setItem(KEY_STORE, key);
    $("who").textContent = `${state.me.user}${state.me.admin ? " (admin)" : ""}`;
    $("nav").hidden = false;
    $("sign-out").hidden = false;
    $("nav-governance").hidden = !state.me.admin;
    $("usage-user").hidden = $("usage-user-label").hidden = !state.me.admin;
    $("routes-note").textContent = state.routes.length
      ? `${state.routes.length} route${state.routes.length === 1 ? "" : "s"} open to you`
      : "No route is open to this key.";
    $("panels").replaceChildren();
    state.panels = [];
    layoutPanels();
    route();
  }

  function signOut(reason = "") {
    sessionStorage.removeItem(KEY_STORE);
    Object.assign(state, { key: null, me: null, routes: [], comparing: false });
    for (const old of state.charts.splice(0)) old.destroy();
    $("nav").hidden = $("sign-out").hidden = true;
    $("who").textContent = "";
    $("signin-error").textContent = reason;
    $("api-key").value = "";
    show("signin");
  }

  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("signin-error").textContent = "";
    const key = $("api-key").value.trim();
    if (!key) return;
    try {
      await signIn(key);
      $("api-key").value = "";
    } catch (error) {
      $("signin-error").textContent = error.status === 401 ? `This key is not accepted: ${error.message}` : error.message;
    }
  });
  $("sign-out").addEventListener("click", () => signOut());
  $("message-form").addEventListener("submit", send);
  $("compare").addEventListener("click", () => {
    if (state.sending) return;
    state.comparing = !state.comparing;
    layoutPanels();
  });
  $("add-route").addEventListener("click", () => {
    if (state.panels.length >= MAX_PANELS || state.sending) return;
    const panel = makePanel();
    state.panels.push(panel);
    $("panels").append(panel.node);
    layoutPanels();
  });
  $("usage-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadUsage();
  });
  $("usage-range").addEventListener("change", loadUsage);
  window.addEventListener("hashchange", route);

  const stored = sessionStorage.getItem(KEY_STORE);
  if (stored) signIn(stored).catch((error) => signOut(error.message));
  else route();
})();
