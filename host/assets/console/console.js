// The plugin-host console: polls the registry's JSON endpoints and draws
// them. Everything a service declared is written with textContent, never
// parsed as HTML. Served under a CSP that allows this file and nothing
// inline.
"use strict";

const POLL_MS = 1500;
const TOKEN_KEY = "plugin-host-admin-token";

// The previous poll's counters per service, to turn totals into rates.
let previous = new Map();
// The action (service, or service and instance) waiting for a second click.
let confirming = null;
// Services whose endpoint list is open: kept open across redraws.
const openEndpoints = new Set();
// The versions the split form's weight inputs were drawn for, so a redraw
// does not wipe what is being typed.
let splitDrawn = "";

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function headers() {
  const sent = { Accept: "application/json" };
  const held = token();
  if (held) {
    sent.Authorization = "Bearer " + held;
  }
  return sent;
}

function element(tag, text, className) {
  const made = document.createElement(tag);
  if (text !== undefined && text !== null) {
    made.textContent = String(text);
  }
  if (className) {
    made.className = className;
  }
  return made;
}

function cell(row, content, className) {
  const td = element("td", undefined, className);
  if (content instanceof Node) {
    td.appendChild(content);
  } else {
    td.textContent = content === undefined || content === null ? "—" : String(content);
  }
  row.appendChild(td);
  return td;
}

function when(stamp) {
  if (!stamp) {
    return "—";
  }
  const seconds = (Date.now() - Date.parse(stamp)) / 1000;
  if (!isFinite(seconds)) {
    return stamp;
  }
  return seconds < 1 ? "just now" : Math.round(seconds) + " s ago";
}

function status(text) {
  return element("span", text, "status-" + text);
}

async function getJson(path) {
  const answer = await fetch(path, { headers: headers(), cache: "no-store" });
  let body = null;
  try {
    body = await answer.json();
  } catch (ignored) {
    body = null;
  }
  return { status: answer.status, body: body };
}

function rates(service, now) {
  const traffic = service.traffic;
  if (!traffic) {
    return { perSecond: null, errors: null };
  }
  const last = previous.get(service.name);
  previous.set(service.name, { at: now, traffic: traffic });
  if (!last || traffic.requests_total < last.traffic.requests_total) {
    return { perSecond: null, errors: null };
  }
  const requests = traffic.requests_total - last.traffic.requests_total;
  const errors = traffic.errors_total - last.traffic.errors_total;
  const seconds = (now - last.at) / 1000;
  return {
    perSecond: seconds > 0 ? (requests / seconds).toFixed(1) : null,
    errors: requests > 0 ? ((100 * errors) / requests).toFixed(1) + " %" : "0 %",
  };
}

function instancesList(service) {
  const list = element("ul", undefined, "plain");
  const instances = service.instances || [];
  for (const instance of instances) {
    const item = element("li");
    item.dataset.instance = instance.id;
    item.appendChild(element("code", instance.id));
    item.appendChild(document.createTextNode(" "));
    item.appendChild(status(instance.status));
    if (instance.last_heartbeat) {
      item.appendChild(element("span", "heartbeat " + when(instance.last_heartbeat), "sub"));
    }
    // The last instance goes with its service (the Deregister button).
    if (instances.length > 1) {
      item.appendChild(confirmButton("Remove", "remove-instance", service.name + " " + instance.id, () =>
        act(
          "removing instance " + instance.id + " of " + service.name,
          "POST",
          "/api/registry/deregister/" + encodeURIComponent(service.name) + "/" + encodeURIComponent(instance.id),
        ),
      ));
    }
    list.appendChild(item);
  }
  if (!list.firstChild) {
    list.appendChild(element("li", service.kind === "plugin" ? "in process" : "—"));
  }
  return list;
}

function versionsCell(service) {
  const versions = service.versions || [];
  if (versions.length < 2) {
    return element("span", service.version);
  }
  const list = element("ul", undefined, "plain");
  for (const version of versions) {
    const item = element("li");
    item.dataset.version = version.version;
    item.appendChild(element("code", version.version));
    item.appendChild(document.createTextNode(" "));
    item.appendChild(status(version.status));
    if (version.version === service.default_version) {
      item.appendChild(element("span", "default", "sub"));
    }
    list.appendChild(item);
  }
  return list;
}

function splitText(service) {
  const split = service.traffic && service.traffic.split;
  if (!split) {
    return "no split: requests naming no version go to " + service.default_version;
  }
  const weights = Object.entries(split.weights).map(([version, weight]) => version + ": " + weight);
  let text = "split: " + weights.join(", ");
  if (split.sticky && split.sticky.header) {
    text += " (sticky on header " + split.sticky.header + ")";
  } else if (split.sticky && split.sticky.cookie) {
    text += " (sticky on cookie " + split.sticky.cookie + ")";
  }
  return text;
}

// The split form: services with two versions or more; a weight input per
// version of the one selected, redrawn only when its versions change.
function drawSplit(services) {
  const form = document.getElementById("split-form");
  const select = document.getElementById("split-service");
  const candidates = services.filter((service) => (service.versions || []).length > 1);
  document.getElementById("split-none").hidden = candidates.length > 0;
  form.hidden = candidates.length === 0;
  const names = candidates.map((service) => service.name);
  const shown = Array.from(select.options).map((option) => option.value);
  if (names.join(" ") !== shown.join(" ")) {
    const chosen = select.value;
    select.replaceChildren(...names.map((name) => element("option", name)));
    if (names.includes(chosen)) {
      select.value = chosen;
    }
  }
  const service = candidates.find((candidate) => candidate.name === select.value);
  const current = document.getElementById("split-current");
  if (!service) {
    current.textContent = "";
    splitDrawn = "";
    return;
  }
  current.textContent = service.name + ": " + splitText(service);
  const versions = service.versions.map((version) => version.version);
  const drawn = service.name + " " + versions.join(" ");
  if (drawn === splitDrawn) {
    return;
  }
  splitDrawn = drawn;
  const split = service.traffic && service.traffic.split;
  const weights = document.getElementById("split-weights");
  weights.replaceChildren();
  for (const version of versions) {
    const label = element("label", version);
    const input = element("input");
    input.type = "number";
    input.min = "0";
    input.max = "10000";
    input.dataset.version = version;
    input.value = split && split.weights[version] !== undefined ? split.weights[version] : 0;
    label.appendChild(input);
    weights.appendChild(label);
  }
  document.getElementById("split-sticky").value =
    split && split.sticky && split.sticky.header ? split.sticky.header : "";
}

function endpointsList(service) {
  const endpoints = service.endpoints || [];
  if (endpoints.length === 0) {
    return element("span", service.kind === "remote" ? "every path" : "none declared");
  }
  const details = element("details");
  details.open = openEndpoints.has(service.name);
  details.addEventListener("toggle", () => {
    if (details.open) {
      openEndpoints.add(service.name);
    } else {
      openEndpoints.delete(service.name);
    }
  });
  details.appendChild(element("summary", endpoints.length + " endpoint" + (endpoints.length === 1 ? "" : "s")));
  const list = element("ul", undefined, "plain");
  for (const endpoint of endpoints) {
    const item = element("li");
    item.appendChild(element("code", endpoint.method + " /api/" + service.name + endpoint.path));
    if (endpoint.description) {
      item.appendChild(element("span", endpoint.description, "sub"));
    }
    list.appendChild(item);
  }
  details.appendChild(list);
  return details;
}

function actions(service) {
  if (service.kind !== "remote") {
    return element("span", "remove its file to unload", "sub");
  }
  return confirmButton("Deregister", "deregister", service.name, () => {
    const name = encodeURIComponent(service.name);
    // The admin token removes the service whoever registered it; without
    // one, the registry's ownership rule decides (the caller's address).
    return token()
      ? act("deregistering " + service.name, "DELETE", "/api/registry/admin/services/" + name)
      : act("deregistering " + service.name, "POST", "/api/registry/deregister/" + name);
  });
}

// A button that asks for a second click before it acts.
function confirmButton(label, className, key, action) {
  const button = element("button", label, className);
  button.type = "button";
  if (confirming === key) {
    button.textContent = "Confirm " + label.toLowerCase();
    button.className = className + " confirm";
  }
  button.addEventListener("click", async () => {
    if (confirming !== key) {
      confirming = key;
      await poll();
      return;
    }
    confirming = null;
    await action();
    await poll();
  });
  return button;
}

function drawServices(services, now) {
  const body = document.querySelector("#services tbody");
  const rows = document.createDocumentFragment();
  const seen = new Set();
  for (const service of services) {
    seen.add(service.name);
    const row = element("tr");
    row.dataset.service = service.name;
    const name = element("span");
    name.appendChild(element("strong", service.name));
    if (service.display_name && service.display_name !== service.name) {
      name.appendChild(element("span", service.display_name, "sub"));
    }
    if (service.description) {
      name.appendChild(element("span", service.description, "sub"));
    }
    cell(row, name);
    cell(row, service.kind);
    cell(row, versionsCell(service));
    const health = element("span");
    health.appendChild(status(service.status));
    if (service.unhealthy_reason) {
      health.appendChild(element("span", service.unhealthy_reason, "sub"));
    }
    cell(row, health);
    cell(row, instancesList(service));
    cell(row, service.kind === "remote" ? when(service.last_heartbeat) : "—");
    cell(row, endpointsList(service));
    const rate = rates(service, now);
    cell(row, rate.perSecond, "num");
    cell(row, rate.errors, "num");
    cell(row, actions(service));
    rows.appendChild(row);
  }
  for (const name of Array.from(previous.keys())) {
    if (!seen.has(name)) {
      previous.delete(name);
    }
  }
  body.replaceChildren(rows);
  document.getElementById("services-empty").hidden = services.length > 0;
}

function drawFiles(answer) {
  const body = document.querySelector("#files tbody");
  const missing = document.getElementById("files-missing");
  if (answer.status !== 200 || !answer.body || !Array.isArray(answer.body.files)) {
    body.replaceChildren();
    missing.hidden = false;
    missing.textContent =
      "GET /api/registry/plugins/files answered " + answer.status +
      (answer.body && answer.body.error ? ": " + answer.body.error : "");
    return;
  }
  missing.hidden = true;
  document.getElementById("files-directory").textContent = "Directory: " + answer.body.directory;
  const rows = document.createDocumentFragment();
  for (const file of answer.body.files) {
    const row = element("tr");
    row.dataset.file = file.file;
    cell(row, element("code", file.file));
    cell(row, element("span", file.state, "state-" + file.state));
    cell(row, file.service);
    cell(row, file.version);
    cell(row, file.reason);
    cell(row, file.since ? when(file.since) : null);
    rows.appendChild(row);
  }
  body.replaceChildren(rows);
}

function report(text, isError) {
  const result = document.getElementById("action-result");
  result.textContent = text;
  result.className = isError ? "error" : "";
}

async function poll() {
  const updated = document.getElementById("updated");
  try {
    const [services, files] = await Promise.all([
      getJson("/api/registry/services"),
      getJson("/api/registry/plugins/files"),
    ]);
    if (services.status !== 200 || !Array.isArray(services.body)) {
      throw new Error(
        "the listing answered " + services.status +
        (services.body && services.body.error ? ": " + services.body.error : ""),
      );
    }
    drawServices(services.body, Date.now());
    drawSplit(services.body);
    drawFiles(files);
    updated.textContent = "updated " + new Date().toLocaleTimeString();
    updated.className = "";
  } catch (error) {
    updated.textContent = "not updated: " + error.message;
    updated.className = "stale";
  }
}

async function act(what, method, path, payload) {
  try {
    const request = { method: method, headers: headers() };
    if (payload !== undefined) {
      request.headers["Content-Type"] = "application/json";
      request.body = JSON.stringify(payload);
    }
    const answer = await fetch(path, request);
    const body = await answer.json().catch(() => ({}));
    if (answer.ok) {
      report(what + ": done", false);
    } else if (answer.status === 401) {
      report(what + ": the registry asks for a token (" + (body.error || answer.status) + "); enter the admin token above.", true);
      document.getElementById("token-input").focus();
    } else {
      report(what + ": refused (" + answer.status + "): " + (body.error || ""), true);
    }
  } catch (error) {
    report(what + " failed: " + error.message, true);
  }
}

function showToken() {
  document.getElementById("token-state").textContent = token() ? "a token is set for this tab" : "no token set";
}

function setUp() {
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token-input");
    if (input.value) {
      sessionStorage.setItem(TOKEN_KEY, input.value);
    }
    input.value = "";
    showToken();
    poll();
  });
  const splitPath = () =>
    "/api/registry/services/" + encodeURIComponent(document.getElementById("split-service").value) + "/traffic";
  document.getElementById("split-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = document.getElementById("split-service").value;
    const weights = {};
    for (const input of document.querySelectorAll("#split-weights input")) {
      weights[input.dataset.version] = Number(input.value);
    }
    const body = { weights: weights };
    const sticky = document.getElementById("split-sticky").value.trim();
    if (sticky) {
      body.sticky = { header: sticky };
    }
    await act("setting the split of " + name, "PUT", splitPath(), body);
    splitDrawn = "";
    await poll();
  });
  document.getElementById("split-clear").addEventListener("click", async () => {
    const name = document.getElementById("split-service").value;
    await act("clearing the split of " + name, "DELETE", splitPath());
    splitDrawn = "";
    await poll();
  });
  document.getElementById("split-service").addEventListener("change", () => {
    splitDrawn = "";
    poll();
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showToken();
    poll();
  });
  showToken();
  poll();
  setInterval(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", setUp);
