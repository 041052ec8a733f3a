"use strict";

// The review page: asks the service for its model, sends each scan in its own request to
// /predict (a few at a time, so they are micro-batched together), and shows the answer.
(() => {
  const TOKEN_KEY = "savlt-token";
  const PARALLEL = 4;
  const KNOWN = new Set([
    "path", "predicted", "probabilities", "high_risk_probability", "roi_box", "roi_fallback",
    "heatmap", "assessable", "reason", "error", "scan", "referral", "referral_threshold",
    "operating_point_established", "referral_rule", "prediction_set", "logits",
  ]);

  const $ = (selector, root = document) => root.querySelector(selector);
  const statusLine = $("#status");
  const results = $("#results");
  const fileInput = $("#file-input");
  const pick = $("#pick");
  const clear = $("#clear");
  let model = null;
  let queue = [];
  let active = 0;
  let counts = { sent: 0, done: 0 };

  const percent = (p) => `${(100 * p).toFixed(1)} %`;
  const fixed = (v, digits = 3) => (typeof v === "number" ? v.toFixed(digits) : "—");
  const label = (name) => (model && model.labels && model.labels[name]) || name;

  function headers() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch {
      return {};
    }
  }

  function askForToken(message) {
    const panel = $("#token-panel");
    panel.hidden = false;
    statusLine.textContent = message;
    $("#token-input").focus();
  }

  // The referral threshold in use on a prediction's high-risk probability (null when the
  // operating point is not established, or the run has none).
  const threshold = (item) => (typeof item.referral_threshold === "number" ? item.referral_threshold : null);

  function fact(list, term, value) {
    const row = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    row.append(dt, dd);
    list.append(row);
  }

  function renderSummary() {
    const facts = $("#summary-facts");
    facts.replaceChildren();
    fact(facts, "Run", model.run);
    fact(facts, "Method", model.method);
    fact(facts, "Backbone", model.backbone);
    fact(facts, "Shots per class", String(model.shots));
    fact(facts, "Trained on", model.train_center);
    fact(facts, "High-risk classes", model.high_risk.map(label).join(", "));
    const op = model.operating_point;
    const note = $("#threshold-note");
    if (op && op.established === false) {
      note.textContent = `Operating point not established: ${op.not_established_because}. The screen falls back to the predicted class: a scan is referred when its predicted class is high-risk.`;
      note.classList.add("warning");
    } else if (op && typeof op.threshold === "number") {
      note.textContent = `Referral rule: refer when the predicted class is high-risk or the high-risk probability reaches ${percent(op.threshold)} (the run's operating point).`;
    } else {
      note.textContent = "This run has no calibrated operating point: a scan is referred when its predicted class is high-risk.";
    }
    const body = $("#center-table tbody");
    body.replaceChildren();
    const centers = Object.entries(model.centers || {});
    for (const [name, m] of centers) {
      const row = document.createElement("tr");
      const binary = m.binary || {};
      // The referral screen when the run is calibrated, else the predicted class alone.
      const screen = m.operating_point && typeof m.operating_point.sensitivity === "number" ? m.operating_point : binary;
      const failed = Boolean(m.operating_point && m.operating_point.screen_failed);
      const verdict = !m.operating_point || m.operating_point.screen_failed === null ? "—" : failed ? "Failed" : "OK";
      const cells = [name, m.n, fixed(m.accuracy), fixed(binary.auc), fixed(screen.sensitivity), fixed(screen.specificity), verdict];
      cells.forEach((value, i) => {
        const cell = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) cell.scope = "row";
        else cell.className = i === cells.length - 1 ? "screen-verdict" : "num";
        cell.textContent = value === undefined || value === null ? "—" : String(value);
        row.append(cell);
      });
      if (failed) {
        row.classList.add("failed");
        row.lastElementChild.title = `Sensitivity below the target ${m.operating_point.target_sensitivity}, and so is the upper end of its interval`;
      }
      body.append(row);
    }
    const atThreshold = centers.some(([, m]) => m.operating_point && typeof m.operating_point.sensitivity === "number");
    $("#screen-note").textContent = atThreshold ? "the referral screen" : "predicted class high-risk";
    $("#center-table").hidden = centers.length === 0;
    $("#summary").hidden = false;
  }

  async function loadModel() {
    let response;
    try {
      response = await fetch("model", { headers: headers() });
    } catch {
      statusLine.textContent = "The service cannot be reached.";
      return;
    }
    if (response.status === 401) {
      askForToken("This service needs an access token.");
      return;
    }
    if (!response.ok) {
      const body = await readJson(response);
      statusLine.textContent = `The model could not be loaded: ${body.error || response.status}`;
      return;
    }
    model = await response.json();
    $("#token-panel").hidden = true;
    renderSummary();
    pick.disabled = false;
    statusLine.textContent = `Ready: ${model.method} on ${model.backbone}, ${model.classes.length} classes.`;
  }

  function newCard(name, after = null) {
    const card = $("#card-template").content.firstElementChild.cloneNode(true);
    card.dataset.file = name;
    $(".file-name", card).textContent = name;
    $(".card-status", card).textContent = "Waiting…";
    if (after) after.after(card);
    else results.append(card);
    clear.disabled = false;
    return card;
  }

  function showScan(card, item) {
    const view = $(".scan-view", card);
    if (!item.scan) return;
    view.hidden = false;
    const image = $(".scan-image", card);
    image.src = item.scan;
    image.alt = `Scan ${item.path}`;
    const box = $(".roi-box", card);
    const caption = $(".roi-caption", card);
    if (item.roi_box) {
      const [x0, y0, x1, y1] = item.roi_box;
      box.style.left = `${100 * x0}%`;
      box.style.top = `${100 * y0}%`;
      box.style.width = `${100 * (x1 - x0)}%`;
      box.style.height = `${100 * (y1 - y0)}%`;
      caption.textContent = item.roi_fallback
        ? "Green box: no tissue band found, the whole scan was used."
        : `Green box: the tissue band the model looked at (from ${percent(y0)} of the height down).`;
    } else {
      box.hidden = true;
      caption.textContent = "";
    }
    if (item.heatmap) {
      const heat = $(".heatmap-image", card);
      heat.src = item.heatmap;
      heat.alt = `Attention heat map of ${item.path}`;
      const toggle = $(".toggle-heatmap", card);
      toggle.hidden = false;
      toggle.addEventListener("click", () => {
        const on = toggle.getAttribute("aria-pressed") !== "true";
        toggle.setAttribute("aria-pressed", String(on));
        toggle.textContent = on ? "Show scan with ROI" : "Show heat map";
        heat.hidden = !on;
        $(".scan-frame", card).hidden = on;
        caption.hidden = on;
      });
    }
  }

  function showExtra(card, item) {
    const extra = $(".extra", card);
    for (const [key, value] of Object.entries(item)) {
      if (KNOWN.has(key)) continue;
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = key.replaceAll("_", " ");
      if (typeof value === "number") dd.textContent = Number.isInteger(value) ? String(value) : value.toFixed(3);
      else if (typeof value === "boolean") dd.textContent = value ? "yes" : "no";
      else if (value === null || value === undefined) dd.textContent = "—";
      else if (typeof value === "object") dd.textContent = JSON.stringify(value);
      else dd.textContent = String(value);
      extra.append(dt, dd);
    }
    extra.hidden = extra.childElementCount === 0;
  }

  function showDiagnosis(card, item) {
    const diagnosis = $(".diagnosis", card);
    diagnosis.hidden = false;
    const top = item.probabilities[item.predicted];
    $(".predicted-class", card).textContent = label(item.predicted);
    $(".predicted-class", card).title = item.predicted;
    $(".predicted-probability", card).textContent = percent(top);
    const risk = item.high_risk_probability;
    const t = threshold(item);
    const text = $(".risk-text", card);
    $(".risk-bar .fill", card).style.width = `${100 * risk}%`;
    // The service's referral is the answer; the page only words it (refer when the predicted class
    // is high-risk or the probability reaches the threshold).
    const highRiskClass = model.high_risk.includes(item.predicted);
    const positive = typeof item.referral === "string" ? item.referral === "refer" : highRiskClass;
    let why;
    if (t === null) {
      why = `predicted class is ${highRiskClass ? "" : "not "}high-risk`;
    } else {
      const marker = $(".risk-bar .marker", card);
      marker.hidden = false;
      marker.style.left = `calc(${100 * t}% - 1px)`;
      const side = risk >= t ? "at or above" : "below";
      why = `${side} the referral threshold ${percent(t)}`;
      if (highRiskClass && risk < t) why += ", but the predicted class is high-risk";
    }
    text.textContent = `${positive ? "Refer" : "No referral"}: high-risk probability ${percent(risk)}, ${why}.`;
    text.classList.add(positive ? "positive" : "negative");
    const fallback = $(".operating-point", card);
    if (item.operating_point_established === false) {
      fallback.hidden = false;
      fallback.textContent = item.referral_rule
        ? `${item.referral_rule.charAt(0).toUpperCase()}${item.referral_rule.slice(1)}.`
        : "Operating point not established: the screen falls back to the predicted class.";
    }
    const set = $(".prediction-set", card);
    if (Array.isArray(item.prediction_set)) {
      set.hidden = false;
      const coverage = model.prediction_sets ? ` (${percent(1 - model.prediction_sets.alpha)} coverage)` : "";
      set.textContent = item.prediction_set.length
        ? `Cannot be ruled out${coverage}: ${item.prediction_set.map(label).join(", ")}`
        : `Prediction set${coverage}: empty — the model is less sure of this scan than of the validation scans`;
    }
    const list = $(".probabilities", card);
    for (const name of model.classes) {
      const p = item.probabilities[name];
      const row = document.createElement("li");
      if (name === item.predicted) row.className = "predicted";
      const nameCell = document.createElement("span");
      nameCell.textContent = label(name);
      nameCell.title = name;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${100 * p}%`;
      bar.append(fill);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = percent(p);
      row.append(nameCell, bar, value);
      list.append(row);
    }
  }

  function showResult(card, item) {
    showScan(card, item);
    if (item.assessable === false || item.predicted === null) {
      card.dataset.state = "unassessable";
      $(".card-status", card).textContent = `Not assessable, no diagnosis: ${item.reason || item.error || "unknown reason"}`;
    } else {
      card.dataset.state = "done";
      $(".card-status", card).textContent = "Analysed.";
      showDiagnosis(card, item);
    }
    showExtra(card, item);
  }

  function showError(card, message) {
    card.dataset.state = "error";
    $(".card-status", card).textContent = message;
  }

  async function predict(file, card) {
    $(".card-status", card).textContent = "Analysing…";
    const body = new FormData();
    body.append("files", file, file.name);
    const query = `scan=true&heatmap=${model.heatmaps ? "true" : "false"}`;
    let response;
    try {
      response = await fetch(`predict?${query}`, { method: "POST", headers: headers(), body });
    } catch {
      showError(card, "The service cannot be reached.");
      return;
    }
    const answer = await readJson(response);
    if (response.status === 401) {
      showError(card, "Not sent: an access token is needed. Enter it above, then choose the scan again.");
      askForToken("This service needs an access token.");
    } else if (!response.ok) {
      showError(card, `Rejected: ${answer.error || `HTTP ${response.status}`}`);
    } else {
      // A TIFF volume gives one result per page: the first fills the file's card, the others follow it.
      let previous = card;
      answer.predictions.forEach((item, i) => {
        const target = i === 0 ? card : newCard(item.path, previous);
        $(".file-name", target).textContent = item.path;
        target.dataset.file = item.path;
        showResult(target, item);
        previous = target;
      });
    }
  }

  function pump() {
    while (active < PARALLEL && queue.length) {
      const [file, card] = queue.shift();
      active += 1;
      predict(file, card).finally(() => {
        active -= 1;
        counts.done += 1;
        statusLine.textContent = `Analysed ${counts.done} of ${counts.sent} scan(s).`;
        pump();
      });
    }
  }

  function addFiles(files) {
    if (!model) return;
    for (const file of files) {
      queue.push([file, newCard(file.name)]);
      counts.sent += 1;
    }
    pump();
  }

  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token-input").value.trim());
    $("#token-input").value = "";
    loadModel();
  });
  pick.addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => {
    addFiles(fileInput.files);
    fileInput.value = "";
  });
  clear.addEventListener("click", () => {
    results.replaceChildren();
    queue = [];
    counts = { sent: active, done: 0 };
    clear.disabled = true;
    pick.focus();
  });
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  loadModel();
})();
