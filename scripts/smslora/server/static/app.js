"use strict";
// The page of scripts/08_serve.py: one message at a time through POST /v1/classify.
(() => {
  const cfg = JSON.parse(document.getElementById("config").textContent);
  const $ = (id) => document.getElementById(id);
  const message = $("message"), button = $("classify"), result = $("result");
  let expected = null;  // the label an example is meant to have

  $("threshold").textContent = cfg.threshold.toFixed(3);
  $("bar-threshold").style.left = `${(100 * cfg.threshold).toFixed(1)}%`;
  message.maxLength = cfg.max_chars;
  if (cfg.api_key_required) $("key-row").hidden = false;

  const count = () => { $("count").textContent = `${message.value.length} / ${cfg.max_chars}`; };
  message.addEventListener("input", () => { expected = null; count(); });
  count();

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = !text;
  }

  function show(res, threshold) {
    const spam = res.label === "spam";
    const verdict = $("verdict");
    verdict.textContent = spam ? "SPAM" : "NOT SPAM";
    verdict.className = spam ? "spam" : "ham";
    $("bar-fill").style.width = `${(100 * res.p_spam).toFixed(1)}%`;
    $("bar-fill").className = spam ? "spam" : "ham";
    $("bar-threshold").style.left = `${(100 * threshold).toFixed(1)}%`;
    $("p-spam").textContent = `P(spam) = ${res.p_spam.toFixed(3)}`;
    $("expected").textContent = expected ? `expected: ${expected === "spam" ? "SPAM" : "NOT SPAM"}` : "";
    result.dataset.pSpam = String(res.p_spam);
    result.hidden = false;
  }

  async function classify() {
    const text = message.value;
    if (!text.trim()) { result.hidden = true; showError("Type a message first."); return; }
    showError("");
    button.disabled = true;
    button.textContent = "Classifying…";
    try {
      const headers = { "Content-Type": "application/json" };
      const key = $("api-key").value.trim();
      if (key) headers["Authorization"] = `Bearer ${key}`;
      const r = await fetch("/v1/classify", {
        method: "POST", headers, body: JSON.stringify({ messages: [text] }),
      });
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
      show(body.results[0], body.threshold);
    } catch (e) {
      result.hidden = true;
      showError(e.message || String(e));
    } finally {
      button.disabled = false;
      button.textContent = "Classify";
      result.dataset.done = String(Number(result.dataset.done) + 1);
    }
  }

  button.addEventListener("click", classify);
  message.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) classify();
  });

  for (const ex of cfg.examples) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.className = "example";
    b.dataset.id = ex.id || "";
    b.textContent = ex.text;
    b.title = "Classify this message";
    b.addEventListener("click", () => {
      message.value = ex.text;
      count();
      expected = ex.label || null;
      classify();
    });
    li.appendChild(b);
    $("examples").appendChild(li);
  }
})();
