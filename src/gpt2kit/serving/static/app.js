"use strict";
// gpt2kit playground: a plain client of the server's public OpenAI-compatible API (the same endpoints a
// program calls: /v1/models, /v1/completions, /v1/chat/completions, /tokenize). No framework, no build step.
(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "gpt2kit-playground-api-key";
  const SETTINGS = [  // [element id = API field, label used in messages]
    ["max_tokens", "Max tokens"], ["temperature", "Temperature"], ["top_k", "Top-k"], ["top_p", "Top-p"],
    ["min_p", "Min-p"], ["repetition_penalty", "Repetition penalty"], ["seed", "Seed"], ["n", "n"],
  ];

  let models = [];     // /v1/models data[]
  let run = null;      // the request in flight, see startRun()
  let history = [];    // chat turns already answered: [{role, content}]
  let pinned = null;   // the chip whose alternatives were opened by a click or tap
  let errorIsKey = false;

  // ---------- small DOM helpers ----------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  const mode = () => document.querySelector("input[name=mode]:checked").value;
  const ms = (t) => (t < 1000 ? `${Math.round(t)} ms` : `${(t / 1000).toFixed(2)} s`);

  // ---------- API key: asked once, kept in this tab (sessionStorage) ----------
  let memoryKey = "";  // where sessionStorage is unavailable (some private modes), the key lives here
  const apiKey = {
    get() { try { return sessionStorage.getItem(KEY_STORE) || ""; } catch (e) { return memoryKey; } },
    set(v) { memoryKey = v; try { sessionStorage.setItem(KEY_STORE, v); } catch (e) { /* memory only */ } },
    clear() { memoryKey = ""; try { sessionStorage.removeItem(KEY_STORE); } catch (e) { /* memory only */ } },
  };

  function askKey(message) {
    const box = $("keyMessage");
    box.textContent = message || "";
    box.hidden = !message;
    $("keyInput").value = "";
    if (!$("keyDialog").open) $("keyDialog").showModal();
    $("keyInput").focus();
  }

  function keyButtonLabel() { $("keyButton").textContent = apiKey.get() ? "API key ✓" : "API key"; }

  // ---------- HTTP ----------
  // An error the server answered with the OpenAI error body {"error": {message, type, param, code}}.
  function serverError(status, err, raw, retryAfter) {
    const said = err && typeof err.message === "string" && err.message
      ? err.message : (raw ? raw.slice(0, 300) : "(the server gave no message)");
    const what = {
      400: "rejected the request", 401: "did not accept the API key", 404: "could not find what was asked for",
      413: "found the request too large", 422: "rejected the request", 429: "has too many requests",
      503: "is busy or shutting down",
    }[status] || "failed";
    let text = status ? `The server ${what} (HTTP ${status}` : "The server stopped with an error (";
    text += (err && err.type ? `${status ? ", " : ""}${err.type}` : "") + `): ${said}`;
    if (err && err.param) text += ` [field: ${err.param}]`;
    if (retryAfter) text += ` Try again in ${retryAfter} s.`;
    const e = new Error(text);
    e.status = status;
    e.serverMessage = said;
    return e;
  }

  async function call(path, body, signal) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const key = apiKey.get();
    if (key) headers.Authorization = `Bearer ${key}`;
    let resp;
    try {
      // Relative paths, so the page also works behind a proxy that mounts the server under a prefix.
      resp = await fetch(path, {
        method: body === undefined ? "GET" : "POST", headers, signal,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new Error(`Could not reach the server (${e.message}). Is gpt2kit serve still running?`);
    }
    if (!resp.ok) {
      let raw = "";
      try { raw = await resp.text(); } catch (e) { /* the body is lost; the status still says it */ }
      let err = null;
      try { err = JSON.parse(raw).error; } catch (e) { /* not the OpenAI error body */ }
      throw serverError(resp.status, err, raw, resp.headers.get("Retry-After"));
    }
    return resp;
  }

  // Server-sent events: `data: {json}` blocks separated by a blank line, ending with `data: [DONE]`.
  async function* events(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r/g, "");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(l[5] === " " ? 6 : 5)).join("\n");
        if (data === "") continue;
        if (data === "[DONE]") return;
        let obj;
        try { obj = JSON.parse(data); } catch (e) {
          throw new Error(`The server sent a stream event that is not JSON: ${data.slice(0, 200)}`);
        }
        if (obj && obj.error) throw serverError(typeof obj.error.code === "number" ? obj.error.code : 0, obj.error, data);
        yield obj;
      }
    }
    throw new Error("The stream ended before the server sent [DONE]: the server stopped or the connection broke.");
  }

  // ---------- errors shown in words ----------
  function showError(message, isKey) {
    $("error").textContent = message;
    $("error").hidden = false;
    errorIsKey = !!isKey;
  }
  function hideError() { $("error").hidden = true; errorIsKey = false; }
  function handleError(e) {
    if (e.status === 401) {
      apiKey.clear();
      keyButtonLabel();
      showError(e.message, true);
      askKey(`The server refused the key: ${e.serverMessage}`);
    } else {
      showError(e.message);
    }
  }

  // ---------- models and the prompt's token count ----------
  const currentModel = () => models.find((m) => m.id === $("model").value.trim());
  const contextLimit = () => { const m = currentModel(); return m && m.max_model_len ? m.max_model_len : null; };

  async function loadModels() {
    $("modelInfo").textContent = "connecting…";
    try {
      const data = await (await call("v1/models")).json();
      models = Array.isArray(data.data) ? data.data : [];
      $("models").replaceChildren(...models.map((m) => el("option", { value: m.id })));
      if (!currentModel() && models.length) $("model").value = models[0].id;
      if (errorIsKey) hideError();
      modelInfo();
      countPromptSoon();
    } catch (e) {
      $("modelInfo").textContent = "";
      handleError(e);
    }
  }

  function modelInfo() {
    const limit = contextLimit();
    $("modelInfo").textContent = limit ? `context ${limit} tokens` : (models.length ? "not served here" : "");
  }

  function messages(userText) {
    const out = [];
    const system = $("system").value;
    if (system.trim()) out.push({ role: "system", content: system });
    return out.concat(history, [{ role: "user", content: userText }]);
  }

  function tokenizeBody() {
    const model = $("model").value.trim();
    const text = $("prompt").value;
    if (mode() === "chat") return { model, messages: messages(text), add_generation_prompt: true };
    return text ? { model, prompt: text } : null;
  }

  let countTimer = 0;
  let countSeq = 0;
  function countPromptSoon() { clearTimeout(countTimer); countTimer = setTimeout(countPrompt, 250); }
  async function countPrompt() {
    const seq = ++countSeq;
    const body = tokenizeBody();
    const info = $("promptInfo");
    if (!body || !body.model) { info.textContent = ""; return; }
    try {
      const r = await (await call("tokenize", body)).json();
      if (seq !== countSeq) return;
      const limit = r.max_model_len || contextLimit();
      info.textContent = `${r.count} tokens` + (limit ? ` of the ${limit}-token context` : "")
        + (limit && r.count >= limit ? ": too long, the server will refuse it" : "");
    } catch (e) {
      if (seq === countSeq) info.textContent = e.status === 401 ? "" : `Token count unavailable: ${e.message}`;
    }
  }

  // ---------- the request, from the form ----------
  function numberSetting(id, label) {
    const input = $(id);
    if (input.validity.badInput) throw new Error(`${label} is not a number: correct it or empty the field.`);
    return input.value.trim() === "" ? undefined : Number(input.value);
  }

  function stopStrings() {
    const unescape = (s) => s.replace(/\\(n|t|\\)/g, (_, c) => (c === "n" ? "\n" : c === "t" ? "\t" : "\\"));
    return $("stop_strings").value.split("\n").filter((l) => l !== "").map(unescape);
  }

  function buildBody(m) {
    const model = $("model").value.trim();
    if (!model) throw new Error("No model name: /v1/models has not answered; type the served model's name.");
    const prompt = $("prompt").value;
    const alts = numberSetting("alts", "Alternatives per token");
    const top = alts === undefined ? 0 : alts;
    if (m === "score") return { model, prompt, max_tokens: 0, echo: true, logprobs: top };
    const body = { model };
    for (const [id, label] of SETTINGS) {
      const v = numberSetting(id, label);
      if (v !== undefined) body[id] = v;
    }
    const stop = stopStrings();
    if (stop.length) body.stop = stop;
    if ($("ignore_eos").checked) body.ignore_eos = true;
    if (m === "chat") {
      if ("max_tokens" in body) { body.max_completion_tokens = body.max_tokens; delete body.max_tokens; }
      Object.assign(body, { messages: messages(prompt), logprobs: true, top_logprobs: top });
    } else {
      Object.assign(body, { prompt, logprobs: top });
    }
    return Object.assign(body, { stream: true, stream_options: { include_usage: true } });
  }

  // ---------- token records from either logprobs shape ----------
  const byProb = (a, b) => b.logprob - a.logprob;
  function completionTokens(lp) {  // {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}
    if (!lp || !Array.isArray(lp.tokens)) return [];
    return lp.tokens.map((token, i) => ({
      token, logprob: lp.token_logprobs[i],
      top: Object.entries((lp.top_logprobs && lp.top_logprobs[i]) || {})
        .map(([t, l]) => ({ token: t, logprob: l })).sort(byProb),
    }));
  }
  function chatTokens(lp) {  // {content: [{token, logprob, top_logprobs: [{token, logprob}]}]}
    if (!lp || !Array.isArray(lp.content)) return [];
    return lp.content.map((e) => ({
      token: e.token, logprob: e.logprob,
      top: (e.top_logprobs || []).map((t) => ({ token: t.token, logprob: t.logprob })).sort(byProb),
    }));
  }

  // ---------- chips and the alternatives tip ----------
  function pct(p) {
    const x = p * 100;
    if (x >= 10) return `${x.toFixed(1)}%`;
    if (x >= 0.01) return `${x.toPrecision(2)}%`;
    return `${x.toExponential(1)}%`;
  }
  // Shade on a log scale: 100% is green, 0.01% and below red, so rare tokens stand out.
  const shade = (lp) => Math.min(1, Math.max(0, 1 + lp / Math.LN10 / 4)).toFixed(3);

  function visible(token) {  // whitespace that would be invisible in a chip gets a faint marker
    if (token === "") return [el("span", { class: "ws", text: "∅" })];
    const parts = [];
    token.split("\n").forEach((piece, i) => {
      if (i) parts.push(el("span", { class: "ws", text: "↵" }), "\n");
      if (piece) parts.push(piece);
    });
    return parts;
  }

  // A token as text inside the tip: line breaks and tabs drawn as signs, so every token keeps one line.
  const label = (token) => el("span", { class: "tok", "data-token": token, text: token === "" ? "∅" : token.replace(/\n/g, "↵").replace(/\t/g, "⇥") });

  function chip(t, i) {
    const c = el("span", { class: "chip", tabindex: "-1", "data-i": i, "data-token": t.token }, ...visible(t.token));
    if (t.logprob === null || t.logprob === undefined) c.classList.add("none");
    else {
      c.setAttribute("data-logprob", String(t.logprob));
      c.style.setProperty("--t", shade(t.logprob));
    }
    c.info = t;
    return c;
  }

  function addChip(group, t) {
    const c = chip(t, group.childElementCount);
    if (!group.firstElementChild) c.tabIndex = 0;  // roving tabindex: one tab stop per group
    group.append(c);
  }

  function tipContent(t, scoring) {
    const rows = [];
    if (t.logprob === null || t.logprob === undefined) {
      rows.push(el("div", { class: "head" }, label(t.token), " first token"),
        el("div", { text: "Nothing comes before it, so the model gives it no probability." }));
      return rows;
    }
    const p = Math.exp(t.logprob);
    rows.push(el("div", { class: "head" }, label(t.token), ` ${pct(p)} · logprob ${t.logprob.toFixed(3)}`));
    if (scoring) rows.push(el("div", { class: "muted", text: `perplexity of this token e^(−logprob) = ${fmt(Math.exp(-t.logprob))}` }));
    if (!t.top.length) {
      rows.push(el("div", { class: "muted", text: "No alternatives asked for (Alternatives per token is 0)." }));
      return rows;
    }
    rows.push(el("div", { class: "muted", text: scoring ? "What the model expected here:" : "Top alternatives:" }));
    const table = el("table");
    for (const a of t.top) {
      const ap = Math.exp(a.logprob);
      const bar = el("span", { class: "bar" });
      bar.style.width = `${Math.max(1, ap * 100)}%`;
      table.append(el("tr", { class: a.token === t.token ? "alt chosen" : "alt", "data-token": a.token, "data-logprob": String(a.logprob) },
        el("td", {}, label(a.token)), el("td", { class: "barcell" }, bar),
        el("td", { class: "p", text: pct(ap) })));
    }
    rows.push(table);
    return rows;
  }
  const fmt = (x) => (x < 1000 ? x.toFixed(2) : x.toExponential(2));

  function showTip(c) {
    const tip = $("tip");
    document.querySelectorAll(".chip.active").forEach((x) => x.classList.remove("active"));
    c.classList.add("active");
    tip.replaceChildren(...tipContent(c.info, !!c.closest(".score")));
    tip.hidden = false;
    c.setAttribute("aria-describedby", "tip");
    const r = c.getBoundingClientRect();
    const w = tip.offsetWidth;
    const h = tip.offsetHeight;
    const left = Math.max(8, Math.min(r.left, document.documentElement.clientWidth - w - 8));
    const below = r.bottom + 6 + h <= window.innerHeight || r.top - 6 - h < 0;
    tip.style.left = `${left + window.scrollX}px`;
    tip.style.top = `${(below ? r.bottom + 6 : r.top - 6 - h) + window.scrollY}px`;
  }
  function hideTip() {
    $("tip").hidden = true;
    pinned = null;
    document.querySelectorAll(".chip.active").forEach((x) => { x.classList.remove("active"); x.removeAttribute("aria-describedby"); });
  }

  function wireChips(container) {
    container.addEventListener("mouseover", (e) => {
      const c = e.target.closest(".chip");
      if (c && !pinned) showTip(c);
    });
    container.addEventListener("mouseout", (e) => {
      const c = e.target.closest(".chip");
      if (c && !pinned && !c.contains(e.relatedTarget) && document.activeElement !== c) hideTip();
    });
    container.addEventListener("click", (e) => {  // a tap on a phone: open, and keep open until tapped again
      const c = e.target.closest(".chip");
      if (!c) return;
      if (pinned === c) { hideTip(); return; }
      showTip(c);
      pinned = c;
      c.focus({ preventScroll: true });
    });
    container.addEventListener("focusin", (e) => {
      const c = e.target.closest(".chip");
      if (!c) return;
      const group = c.parentElement;
      for (const x of group.querySelectorAll(".chip[tabindex='0']")) x.tabIndex = -1;
      c.tabIndex = 0;
      if (pinned !== c) { pinned = null; showTip(c); }
    });
    container.addEventListener("focusout", (e) => {
      if (e.target.closest(".chip") && !(e.relatedTarget && e.relatedTarget.closest && e.relatedTarget.closest(".chip"))) hideTip();
    });
    container.addEventListener("keydown", (e) => {
      const c = e.target.closest(".chip");
      if (!c) return;
      const chips = c.parentElement.children;
      const i = Number(c.dataset.i);
      const to = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: chips.length - 1 }[e.key];
      if (to !== undefined) {
        e.preventDefault();
        if (chips[Math.max(0, Math.min(to, chips.length - 1))]) chips[Math.max(0, Math.min(to, chips.length - 1))].focus();
      } else if (e.key === "Escape") { e.stopPropagation(); hideTip(); }
    });
  }

  // ---------- a running request ----------
  function setRunning(on) {
    $("generate").disabled = on;
    $("stop").disabled = !on;
    document.body.dataset.state = on ? "running" : document.body.dataset.state;
    if (!on && document.activeElement === document.body) $("generate").focus();
  }

  function startRun(m, prompt) {
    hideError();
    hideTip();
    run = {
      mode: m, prompt, controller: new AbortController(), t0: performance.now(), tFirst: 0, tLast: 0,
      generated: 0, atFirst: 0, promptTokens: null, usage: null, choices: [], ticker: 0,
    };
    setRunning(true);
    $("runState").textContent = "Waiting for the first token…";
    $("ttft").textContent = $("speed").textContent = "…";
    $("context").textContent = "–";
    run.ticker = setInterval(() => { if (run && !run.tFirst) $("ttft").textContent = `waiting ${ms(performance.now() - run.t0)}`; }, 100);
    return run;
  }

  function choiceView(index) {
    if (run.choices[index]) return run.choices[index];
    const text = el("pre", { class: "text" });
    if (run.mode === "completion") text.append(el("span", { class: "prompt", text: run.prompt }));
    const gen = el("span", { class: "gen" });
    text.append(gen);
    const tokens = el("div", { class: "tokens", role: "group", "aria-label": `Tokens of choice ${index + 1}` });
    const status = el("span", { class: "finish" });
    const panel = el("article", { class: "choice", "data-index": index },
      el("header", {}, el("span", { text: run.mode === "chat" ? `assistant · choice ${index + 1}` : `choice ${index + 1}` }), status),
      text, tokens);
    const outputs = $("outputs");
    const after = [...outputs.querySelectorAll(".choice")].find((p) => Number(p.dataset.index) > index);
    outputs.insertBefore(panel, after || null);
    run.choices[index] = { panel, gen, tokens, status, text: "", count: 0, finish: null };
    return run.choices[index];
  }

  function onChunk(chunk) {
    const now = performance.now();
    if (chunk.usage) run.usage = chunk.usage;
    for (const c of chunk.choices || []) {
      const view = choiceView(c.index || 0);
      const text = run.mode === "chat" ? (c.delta && c.delta.content) || "" : c.text || "";
      const toks = run.mode === "chat" ? chatTokens(c.logprobs) : completionTokens(c.logprobs);
      if (text) { view.gen.append(text); view.text += text; }
      for (const t of toks) addChip(view.tokens, t);
      // Without logprobs a chunk carries one token (the server streams token by token).
      const n = toks.length || (text ? 1 : 0);
      if (n && !run.tFirst) { run.tFirst = now; run.atFirst = 0; }
      if (n && run.tFirst === now) run.atFirst += n;
      view.count += n;
      run.generated += n;
      if (n) run.tLast = now;
      if (c.finish_reason) { view.finish = c.finish_reason; view.status.textContent = `finish: ${c.finish_reason}`; }
    }
    stats(run);
  }

  function stats(r) {
    if (r.tFirst) {
      $("ttft").textContent = ms(r.tFirst - r.t0);
      $("runState").textContent = "Streaming…";
    }
    const dt = (r.tLast - r.tFirst) / 1000;
    if (r.generated > r.atFirst && dt > 0) $("speed").textContent = `${((r.generated - r.atFirst) / dt).toFixed(1)} tokens/s`;
    const p = r.usage ? r.usage.prompt_tokens : r.promptTokens;
    const g = Math.max(0, ...r.choices.filter(Boolean).map((v) => v.count));
    const limit = contextLimit();
    $("context").textContent = `${p === null || p === undefined ? "?" : p} + ${g}` + (limit ? ` of ${limit}` : "");
  }

  function finish(how) {
    const r = run;
    run = null;
    clearInterval(r.ticker);
    document.body.dataset.state = how;
    setRunning(false);
    if (r.mode === "score") {
      $("ttft").textContent = $("speed").textContent = "–";
      if (r.scored !== undefined) $("context").textContent = `${r.scored}` + (contextLimit() ? ` of ${contextLimit()}` : "");
    } else {
      for (const v of r.choices.filter(Boolean)) if (!v.finish && how !== "done") v.status.textContent = how;
      if (!r.tFirst) $("ttft").textContent = "–";
      if (!(r.generated > r.atFirst)) $("speed").textContent = "–";
      stats(r);
    }
    const took = ms(performance.now() - r.t0);
    $("runState").textContent = { done: `Done in ${took}.`, error: "Failed.",
      stopped: `Stopped after ${took}: the stream was closed, so the server dropped the request.` }[how];
    if (how === "done" && r.mode === "chat" && r.choices[0]) {
      history.push({ role: "user", content: r.prompt }, { role: "assistant", content: r.choices[0].text });
      $("prompt").value = "";
      countPromptSoon();
    }
  }
  async function generate() {
    if (run) return;
    const m = mode();
    let body;
    try { body = buildBody(m); } catch (e) { hideTip(); showError(e.message); return; }
    if (m === "score") return score(body);
    const r = startRun(m, $("prompt").value);
    $("outputs").replaceChildren();
    if (m === "chat") {
      renderTranscript();
      $("outputs").append(el("div", { class: "turn user" }, el("div", { class: "who", text: "you" }), el("div", { class: "said", text: r.prompt })));
    }
    const tokenize = tokenizeBody();  // the context figure: counted beside the request, replaced by usage
    if (tokenize) call("tokenize", tokenize).then((x) => x.json()).then((x) => { r.promptTokens = x.count; if (run === r) stats(r); }, () => {});
    try {
      const resp = await call(m === "chat" ? "v1/chat/completions" : "v1/completions", body, r.controller.signal);
      for await (const chunk of events(resp)) onChunk(chunk);
      finish("done");
    } catch (e) {
      if (e.name === "AbortError") finish("stopped");
      else { finish("error"); handleError(e); }
    }
  }

  function renderTranscript() {
    const t = $("transcript");
    t.replaceChildren(...history.map((turn) => el("div", { class: `turn ${turn.role}` },
      el("div", { class: "who", text: turn.role === "user" ? "you" : turn.role }), turn.content
        ? el("div", { class: "said", text: turn.content }) : el("div", { class: "said muted", text: "(an empty reply)" }))));
    t.hidden = mode() !== "chat" || !history.length;
  }

  // Prompt scoring: echo + max_tokens 0 + logprobs gives each prompt token's log-probability (the first: null).
  async function score(body) {
    const r = startRun("score", body.prompt);
    const box = $("score");
    box.replaceChildren();
    try {
      const data = await (await call("v1/completions", body, r.controller.signal)).json();
      const toks = completionTokens(data.choices && data.choices[0] && data.choices[0].logprobs);
      if (!toks.length) throw new Error("The server's answer has no echo logprobs (choices[0].logprobs.tokens is missing).");
      renderScore(box, toks);
      r.scored = toks.length;
      finish("done");
    } catch (e) {
      if (e.name === "AbortError") finish("stopped");
      else { finish("error"); handleError(e); }
    }
  }

  function renderScore(box, toks) {
    const scored = toks.filter((t) => t.logprob !== null && t.logprob !== undefined);
    const total = scored.reduce((s, t) => s + t.logprob, 0);
    const mean = scored.length ? total / scored.length : NaN;
    const worst = scored.reduce((w, t) => (!w || t.logprob < w.logprob ? t : w), null);
    const figure = (id, label, value, shown) => el("span", {}, `${label} `, el("b", { id, "data-value": String(value), text: shown }));
    box.append(el("div", { class: "summary" },
      figure("scoreCount", "Tokens", toks.length, `${toks.length} (${scored.length} scored)`),
      figure("scoreTotal", "Total log-prob", total, total.toFixed(3)),
      figure("scoreMean", "Mean per token", mean, scored.length ? mean.toFixed(3) : "–"),
      figure("scorePpl", "Perplexity", Math.exp(-mean), scored.length ? fmt(Math.exp(-mean)) : "–"),
      worst ? el("span", {}, "Most surprising ", el("span", { class: "sample", style: `--t:${shade(worst.logprob)}` }, ...visible(worst.token)),
        ` ${pct(Math.exp(worst.logprob))}`) : null));
    const group = el("div", { class: "tokens", role: "group", "aria-label": "Prompt tokens by log-probability" });
    for (const t of toks) addChip(group, t);
    box.append(group);
  }

  // ---------- modes, keys, start ----------
  function onMode() {
    const m = mode();
    $("systemRow").hidden = m !== "chat";
    $("clearChat").hidden = m !== "chat";
    $("settings").hidden = m === "score";
    $("views").hidden = m === "score";
    $("outputs").hidden = m === "score";
    $("score").hidden = m !== "score";
    $("promptLabel").textContent = { completion: "Prompt", chat: "Your message", score: "Text to score" }[m];
    $("generate").textContent = { completion: "Generate", chat: "Send", score: "Score" }[m];
    renderTranscript();
    countPromptSoon();
  }

  function init() {
    document.body.dataset.state = "idle";
    wireChips($("outputs"));
    wireChips($("score"));
    document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", onMode));
    document.querySelectorAll("input[name=view]").forEach((r) => r.addEventListener("change", () => {
      $("outputs").dataset.view = document.querySelector("input[name=view]:checked").value;
      hideTip();
    }));
    $("generate").addEventListener("click", generate);
    $("stop").addEventListener("click", () => { if (run) run.controller.abort(); });
    $("clearChat").addEventListener("click", () => { history = []; renderTranscript(); $("outputs").replaceChildren(); countPromptSoon(); });
    for (const id of ["prompt", "system"]) {
      $(id).addEventListener("input", countPromptSoon);
      $(id).addEventListener("keydown", (e) => {
        if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
      });
    }
    $("model").addEventListener("change", () => { modelInfo(); countPromptSoon(); });
    document.addEventListener("keydown", (e) => {
      if (e.key !== "Escape" || $("keyDialog").open) return;
      if (!$("tip").hidden) hideTip();
      else if (run) run.controller.abort();
    });
    document.addEventListener("click", (e) => { if (pinned && !e.target.closest(".chip") && !e.target.closest("#tip")) hideTip(); });

    $("keyButton").addEventListener("click", () => askKey(""));
    $("keyForm").addEventListener("submit", (e) => {
      e.preventDefault();
      const v = $("keyInput").value.trim();
      if (!v) return;
      apiKey.set(v);
      keyButtonLabel();
      $("keyDialog").close();
      loadModels();
    });
    $("keyForget").addEventListener("click", () => { apiKey.clear(); keyButtonLabel(); $("keyDialog").close(); });
    $("keyCancel").addEventListener("click", () => $("keyDialog").close());
    keyButtonLabel();

    if (window.matchMedia("(max-width: 760px)").matches) $("settings").open = false;
    else $("prompt").focus();
    loadModels();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
}());
