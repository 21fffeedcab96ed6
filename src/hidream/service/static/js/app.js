// The web playground: a key, a form built from GET /api/v1/models, a run with live progress, the
// result and the key's history. Plain DOM, no framework; the API's rules are the server's, and its
// error messages ("field: rule (got x)") are shown next to the control of the field they name.

import { Api, ApiError, isTerminal, randomKey } from "./api.js";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "hidream.playground.key";
const HISTORY_PAGE = 12;
const PRESET_NAMES = {
  square_hd: "Square HD", square: "Square", portrait_4_3: "Portrait 3:4", portrait_16_9: "Portrait 9:16",
  landscape_4_3: "Landscape 4:3", landscape_16_9: "Landscape 16:9",
};
const MODE_NAMES = { "text-to-image": "Text to image", edit: "Edit", personalization: "Personalize" };
// The other providers' APIs a run can come through (its input's `surface`); none: this API or the playground.
const SURFACE_NAMES = { wavespeed: "WaveSpeed's API", replicate: "Replicate's API", fal: "fal's API" };

// API field -> [the control to focus, the element that shows its error]
const FIELDS = {
  prompt: ["prompt", "prompt-error"],
  image_size: ["width", "size-error"],
  num_inference_steps: ["steps", "steps-error"],
  guidance_scale: ["guidance", "guidance-error"],
  output_format: ["format", "format-error"],
  seed: ["seed", "seed-error"],
  reference_image_urls: ["ref-files", "refs-error"],
  file: ["ref-files", "refs-error"],
  keep_original_aspect: ["keep-aspect", "keep-aspect-error"],
  snap_to_native: ["native-size", "native-error"],
  refine_prompt: ["refine", "refine-error"],
  layout_boxes: ["layout-0", "layout-error"],
  seam_smoothing: ["seams", "seams-error"],
  cache: ["cache", "cache-error"],
  num_images: ["num-images", "num-images-error"],
  model: ["model", "model-error"],
  loras: ["lora-add", "lora-error"],
};

const api = new Api();
const state = {
  models: [],
  params: null,
  price: 0,
  mode: "text-to-image",
  refs: [], // {id, name, thumb, url, status: "uploading" | "ready" | "error", error}
  lastSeed: null,
  current: null, // the prediction on the stage
  selected: 0, // which of its outputs
  run: null, // {id, abort, first: {step, t}}
  historyCursor: null,
  formReady: false,
  loras: [], // the LoRA files this service serves (GET /api/v1/loras), those that can be used
  loraRows: [], // the picker's rows: {id, name, scale (the input's text)}
};
let refCounter = 0;
let loraCounter = 0;

// --- small helpers -------------------------------------------------------------------------------------

const money = (usd) => new Intl.NumberFormat("en-US", {
  style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 4,
}).format(usd);

function announce(text) {
  const el = $("announcer");
  el.textContent = "";
  // a fresh text node, a tick later, so that the same words twice are still read out
  setTimeout(() => { el.textContent = text; }, 50);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value == null) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

/** An output or upload URL of this server on this page's origin (the page may be opened by another name). */
function local(url) {
  try {
    const u = new URL(url, location.href);
    if (u.origin !== location.origin && u.pathname.startsWith("/files/")) {
      return `${location.origin}${u.pathname}${u.search}`;
    }
    return u.href;
  } catch {
    return url;
  }
}

function formatEta(seconds) {
  if (seconds < 1) return "less than a second left";
  if (seconds < 60) return `about ${Math.round(seconds)} s left`;
  const m = Math.floor(seconds / 60);
  const s = Math.round(seconds % 60);
  return `about ${m} min ${s} s left`;
}

function ago(iso) {
  if (!iso) return "";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

function saveKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
  } catch {
    // storage disabled: the key lives as long as the page
  }
}

function savedKey() {
  try {
    return localStorage.getItem(KEY_STORE) || "";
  } catch {
    return "";
  }
}

// --- errors next to their fields -----------------------------------------------------------------------

class ClientError extends Error {
  constructor(field, rule) {
    super(`${field}: ${rule}`);
    this.field = field;
  }
}

function clearErrors() {
  for (const [control, error] of Object.values(FIELDS)) {
    $(error).textContent = "";
    $(control)?.removeAttribute("aria-invalid"); // (a layout box exists only with references)
  }
  for (const input of $("layout-boxes").querySelectorAll("input")) input.removeAttribute("aria-invalid");
  for (const id of ["height", "api-key"]) $(id).removeAttribute("aria-invalid");
  $("form-error").textContent = "";
  for (const li of $("refs").children) li.classList.remove("invalid");
  clearLoraErrors();
}

function clearFieldError(control) {
  for (const [c, error] of Object.values(FIELDS)) {
    if (c === control || (control === "height" && c === "width")) {
      $(error).textContent = "";
      $(c)?.removeAttribute("aria-invalid");
      $("height").removeAttribute("aria-invalid");
    }
  }
}

/** Shows `message` next to the control of the field it names (else above the button); true if it named one. */
function showError(message, field = "") {
  const base = field.replace(/\[\d+\](?:\.[a-z_]+)?$/, "");
  const entry = FIELDS[base];
  if (base === "loras") return showLoraError(message, field);
  if (!entry) {
    $("form-error").textContent = message;
    return false;
  }
  let [controlId, errorId] = entry;
  if (base === "image_size" && $("custom-size").hidden) {
    controlId = document.querySelector('input[name="size"]:checked')?.id || controlId;
  }
  if (base === "layout_boxes") {
    const index = /\[(\d+)\]/.exec(field);
    controlId = `layout-${index ? index[1] : 0}`;
    if (!$(controlId) || $("layout-field").hidden) {
      $("form-error").textContent = message;
      return false;
    }
  }
  if (base === "model" && $("model-field").hidden) {
    $("form-error").textContent = message;
    return false;
  }
  $(errorId).textContent = message;
  const control = $(controlId);
  control.setAttribute("aria-invalid", "true");
  if (base === "image_size" && !$("custom-size").hidden) $("height").setAttribute("aria-invalid", "true");
  const index = /\[(\d+)\]$/.exec(field);
  if (base === "reference_image_urls" && index) $("refs").children[Number(index[1])]?.classList.add("invalid");
  if (!control.disabled) control.focus({ preventScroll: false });
  control.scrollIntoView({ block: "center", behavior: "smooth" });
  return true;
}

function handleApiError(err, where = "form") {
  if (err instanceof ApiError && err.status === 401) {
    openKeyPanel(err.message);
    return;
  }
  let message = err.message || String(err);
  if (err instanceof ApiError && err.status === 429 && err.retryAfter) {
    message += ` (retry in ${err.retryAfter} s)`;
  }
  if (where === "form") showError(message, err.field || "");
  else if (where === "refs") showError(message, "reference_image_urls");
  else $("result-error").textContent = message;
}

// --- the key -------------------------------------------------------------------------------------------

function openKeyPanel(error = "") {
  const panel = $("key-panel");
  panel.hidden = false;
  $("key-cancel").hidden = !api.key || Boolean(error);
  $("key-forget").hidden = !savedKey();
  $("api-key").value = "";
  $("api-key-error").textContent = error;
  if (error) $("api-key").setAttribute("aria-invalid", "true");
  $("api-key").focus();
}

async function useKey(key, { fromStorage = false } = {}) {
  key = key.trim();
  if (!key) {
    $("api-key-error").textContent = "Enter an API key.";
    $("api-key").setAttribute("aria-invalid", "true");
    $("api-key").focus();
    return;
  }
  const previous = api.key;
  api.key = key;
  $("key-submit").disabled = true;
  try {
    state.models = await api.models();
  } catch (err) {
    api.key = previous;
    const message = err.status === 401 ? `This key was not accepted: ${err.message}.` : err.message;
    if (fromStorage && err.status === 401) saveKey("");
    openKeyPanel(message);
    return;
  } finally {
    $("key-submit").disabled = false;
  }
  saveKey(key);
  $("api-key").removeAttribute("aria-invalid");
  $("api-key-error").textContent = "";
  $("key-panel").hidden = true;
  $("account").hidden = false;
  $("key-tail").textContent = `…${key.slice(-4)}`;
  $("app").hidden = false;
  if (!state.formReady) buildForm();
  loadLoras();
  refreshUsage();
  loadHistory(true);
  if (!fromStorage) {
    announce("Key accepted.");
    $("prompt").focus();
  }
}

async function refreshUsage() {
  try {
    const usage = await api.usage();
    $("usage").textContent = `${usage.images} ${usage.images === 1 ? "image" : "images"}, ${money(usage.amount_usd)}`;
  } catch (err) {
    if (err.status === 401) handleApiError(err);
  }
}

// --- the form, from the model's parameter schema -------------------------------------------------------

function buildForm() {
  const model = state.models[0];
  const p = model.parameters;
  state.params = p;
  state.price = model.price_per_image_usd;
  $("price").textContent = money(state.price);

  if (state.models.length > 1) {
    $("model-field").hidden = false;
    for (const m of state.models) $("model").append(el("option", { value: m.id, text: m.id }));
  }
  $("model").addEventListener("change", () => {
    const m = state.models.find((x) => x.id === $("model").value) || model;
    state.price = m.price_per_image_usd;
    $("price").textContent = money(state.price);
    updateCost();
  });

  const max = p.prompt?.max_length;
  if (max) $("prompt").maxLength = max;
  const updateCount = () => {
    const n = [...$("prompt").value].length;
    $("prompt-count").textContent = max ? `${n.toLocaleString()} / ${max.toLocaleString()} characters` : "";
  };
  $("prompt").addEventListener("input", () => { updateCount(); clearFieldError("prompt"); });
  updateCount();

  // sizes: a radio per preset, with a rectangle of its aspect, and "custom"
  const sizes = $("sizes");
  const presets = p.image_size.presets;
  for (const [name, { width, height }] of Object.entries(presets)) {
    sizes.append(sizeOption(name, PRESET_NAMES[name] || name.replace(/_/g, " "), `${width} × ${height}`,
      width, height));
  }
  sizes.append(sizeOption("custom", "Custom", "your own", 4, 3));
  const custom = p.image_size.custom;
  // the server may suggest a size to start from instead of the default (the demo model's own)
  const suggested = suggestedSize(model.suggested);
  for (const id of ["width", "height"]) {
    const input = $(id);
    input.min = custom.min_side;
    input.max = custom.max_side;
    input.step = custom.multiple_of;
    input.value = suggested ? suggested[id] : 1024;
    input.addEventListener("input", () => { clearFieldError(id); updateSize(); });
  }
  $("size-rule").textContent = `Custom sides from ${custom.min_side} to ${custom.max_side} pixels, rounded to `
    + `multiples of ${custom.multiple_of}, at most ${(custom.max_pixels / 1e6).toFixed(1)} megapixels.`;
  const def = (suggested && $("size-custom"))
    || document.querySelector(`input[name="size"][value="${p.image_size.default}"]`)
    || sizes.querySelector('input[name="size"]');
  def.checked = true;
  showDemoWorld(state.models.find((m) => m.demo === true && m.demo_world)?.demo_world);
  sizes.addEventListener("change", () => { clearFieldError("width"); updateSize(); });

  numberField("steps", p.num_inference_steps, 1);
  numberField("guidance", p.guidance_scale, 0.1);
  $("steps-hint").textContent = `${p.num_inference_steps.minimum} to ${p.num_inference_steps.maximum}; `
    + `default ${p.num_inference_steps.default}.`;
  $("guidance-hint").textContent = `${p.guidance_scale.minimum} to ${p.guidance_scale.maximum}; `
    + `default ${p.guidance_scale.default}; 1 means no guidance.`;

  for (const fmt of p.output_format.enum) {
    $("format").append(el("option", { value: fmt, text: fmt.toUpperCase() }));
  }
  $("format").value = p.output_format.default;
  $("format").addEventListener("change", () => clearFieldError("format"));

  const n = p.num_images;
  Object.assign($("num-images"), { min: n.minimum, max: n.maximum, step: 1, value: n.default });
  $("num-images-hint").textContent = `${n.minimum} to ${n.maximum}, each billed.`;
  $("num-images").addEventListener("input", () => { clearFieldError("num-images"); updateCost(); });

  Object.assign($("seed"), { min: Math.max(0, p.seed.minimum), max: p.seed.maximum, step: 1 });
  $("seed").addEventListener("input", () => clearFieldError("seed"));
  $("seed-random").addEventListener("change", () => {
    $("seed").disabled = $("seed-random").checked;
    if (!$("seed").disabled) {
      if ($("seed").value === "") $("seed").value = state.lastSeed ?? 0;
      $("seed").focus();
    }
  });
  $("seed-reuse").addEventListener("click", () => {
    if (state.lastSeed == null) return;
    $("seed-random").checked = false;
    $("seed").disabled = false;
    $("seed").value = state.lastSeed;
    clearFieldError("seed");
    announce(`Seed set to ${state.lastSeed}.`);
  });

  $("keep-aspect").addEventListener("change", () => { clearFieldError("keep-aspect"); updateSize(); });
  $("native-field").hidden = !state.params.snap_to_native;
  $("refine-field").hidden = !state.params.refine_prompt?.available;
  $("seams-field").hidden = !state.params.seam_smoothing;
  $("seams").addEventListener("change", () => clearFieldError("seams"));
  $("cache-field").hidden = !state.params.cache;
  $("cache").addEventListener("change", () => clearFieldError("cache"));
  $("refine").addEventListener("change", () => clearFieldError("refine"));
  $("native-size").addEventListener("change", () => { clearFieldError("native-size"); updateSize(); });

  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => setMode(radio.value));
  }
  setMode("text-to-image");
  updateSize();
  updateCost();
  state.formReady = true;
}

/** `suggested.image_size` of GET /api/v1/models as { width, height }, or null when there is none (real weights). */
function showDemoWorld(world) {
  $("demo-note").hidden = !world;
  if (!world) return;
  $("demo-about").textContent = world.about;
  $("demo-words").textContent = `Colours: ${world.colours.join(", ")}. Shapes: ${world.shapes.join(", ")}. `
    + `Positions: ${world.positions.join(", ")}. Edits: ${world.grammar.edit.join("; ")}. `
    + `Personalize: ${world.grammar.personalization}.`;
  const box = $("demo-examples");
  box.replaceChildren(el("span", { class: "label", text: "Try:" }));
  for (const [mode, prompts] of Object.entries(world.examples)) {
    for (const prompt of prompts) {
      // an example sets the mode and the prompt; edits and personalization still need their references
      box.append(el("button", { type: "button", class: "chip", text: prompt,
        "aria-label": `${MODE_NAMES[mode] || mode}: ${prompt}`,
        onclick: () => {
          setMode(mode);
          $("prompt").value = prompt;
          $("prompt").dispatchEvent(new Event("input"));
          $("prompt").focus();
        } }));
    }
  }
}

/** `suggested.image_size` of GET /api/v1/models as { width, height }, or null when there is none (real weights). */
function suggestedSize(suggested) {
  const size = suggested?.image_size;
  const ok = (n) => Number.isInteger(n) && n > 0;
  return size && ok(size.width) && ok(size.height) ? { width: size.width, height: size.height } : null;
}

function sizeOption(value, title, detail, w, h) {
  const id = `size-${value}`;
  const shape = el("span", { class: "shape", "aria-hidden": "true" });
  shape.style.aspectRatio = `${w} / ${h}`;
  if (w >= h) shape.style.width = "28px";
  else shape.style.height = "28px";
  return el("label", { class: "size-option", for: id },
    el("input", { type: "radio", name: "size", id, value, "aria-describedby": "size-error" }),
    el("span", { class: "shape-box" }, shape),
    el("span", { class: "size-text" }, el("span", { class: "size-title", text: title }),
      el("span", { class: "size-detail", text: detail })));
}

function numberField(id, spec, step) {
  const input = $(id);
  const range = $(`${id}-range`);
  for (const node of [input, range]) {
    Object.assign(node, { min: spec.minimum, max: spec.maximum, step });
    node.value = spec.default;
  }
  range.step = step < 1 ? 0.5 : 1;
  input.addEventListener("input", () => {
    clearFieldError(id);
    if (input.value !== "") range.value = input.value;
  });
  range.addEventListener("input", () => {
    input.value = range.value;
    clearFieldError(id);
  });
}

/** The size the request will have, as [width, height] after rounding, or null (keep the reference's). */
function currentSize() {
  const checked = document.querySelector('input[name="size"]:checked');
  if (!checked) return null;
  if (checked.value !== "custom") {
    const { width, height } = state.params.image_size.presets[checked.value];
    return [width, height];
  }
  const m = state.params.image_size.custom.multiple_of;
  const w = Math.round(Number($("width").value) / m) * m;
  const h = Math.round(Number($("height").value) / m) * m;
  return [w, h];
}

function keepAspect() {
  return !$("keep-aspect-field").hidden && $("keep-aspect").checked;
}

// The native size nearest an aspect ratio, as the server snaps (the first of equally near ones).
function nativeSize(ratio) {
  let best = null;
  for (const s of state.params.snap_to_native?.sizes || []) {
    const diff = Math.abs(s.width / s.height - ratio);
    if (!best || diff < best.diff) best = { ...s, diff };
  }
  return best;
}

function nativeChecked() {
  return !$("native-field").hidden && $("native-size").checked;
}

function updateSize() {
  const checked = document.querySelector('input[name="size"]:checked');
  $("custom-size").hidden = checked?.value !== "custom";
  const kept = keepAspect();
  $("size-field").disabled = kept;
  const box = $("aspect-box");
  const summary = $("size-summary");
  if (kept) {
    const ref = state.refs[0];
    box.style.aspectRatio = ref?.ratio ? `${ref.ratio}` : "1";
    const native = nativeChecked() && ref?.ratio ? nativeSize(ref.ratio) : null;
    summary.textContent = native ? `The reference's aspect ratio: made at ${native.width} × ${native.height} (native).`
      : "The reference's aspect ratio, about 4 megapixels.";
    return;
  }
  let [w, h] = currentSize();
  if (w > 0 && h > 0 && nativeChecked()) {
    const native = nativeSize(w / h);
    if (native) [w, h] = [native.width, native.height];
  }
  if (!(w > 0 && h > 0)) {
    summary.textContent = "Enter a width and a height.";
    box.style.aspectRatio = "1";
    return;
  }
  box.style.aspectRatio = `${w} / ${h}`;
  const mp = ((w * h) / 1e6).toFixed(w * h < 1e5 ? 2 : 1);
  let text = `${w} × ${h} pixels, ${mp} megapixels`;
  if (nativeChecked()) text += " (the native size nearest the one chosen)";
  else if (checked.value === "custom"
      && (String(w) !== $("width").value || String(h) !== $("height").value)) {
    text += " (after rounding)";
  }
  summary.textContent = text;
  // the custom option's own rectangle follows what is typed
  const shape = document.querySelector("#size-custom + .shape-box .shape");
  if (shape && checked.value === "custom") {
    shape.style.aspectRatio = `${w} / ${h}`;
    shape.style.width = w >= h ? "28px" : "";
    shape.style.height = w >= h ? "" : "28px";
  }
}

function updateCost() {
  const n = Number($("num-images").value) || 1;
  $("cost").textContent = n > 1 ? `${n} images × ${money(state.price)} = ${money(n * state.price)}`
    : `${money(state.price)} per image`;
}

function setMode(mode) {
  state.mode = mode;
  const radio = document.querySelector(`input[name="mode"][value="${mode}"]`);
  if (radio && !radio.checked) radio.checked = true;
  const maxRefs = state.params?.reference_image_urls?.max_items ?? 10;
  $("refs-field").hidden = mode === "text-to-image";
  $("mode-hint").textContent = {
    "text-to-image": "An image from the prompt alone.",
    edit: "Change one reference image as the prompt says.",
    personalization: `Put the subjects of 2 to ${maxRefs} reference images into a new scene.`,
  }[mode];
  $("ref-files").multiple = mode === "personalization";
  $("ref-files-label").textContent = mode === "edit"
    ? (state.refs.length ? "Replace the image…" : "Choose an image…") : "Choose images…";
  $("refs-hint").textContent = mode === "edit" ? "Drop one image here, or" : "Drop images here, or";
  clearFieldError("ref-files");
  renderRefs();
}

// --- LoRAs: a picker of the served files, each row a file and its scale ---------------------------------

async function loadLoras() {
  let files = [];
  try {
    files = await api.loras();
  } catch (err) {
    if (err.status === 401) {
      handleApiError(err);
      return;
    }
    // a server without the route, or one that could not list them now: no picker
  }
  state.loras = (Array.isArray(files) ? files : []).filter((f) => !f.error);
  state.loraRows = state.loraRows.filter((row) => state.loras.some((f) => f.name === row.name));
  $("lora-field").hidden = state.loras.length === 0;
  renderLoras();
}

const loraLimit = () => state.params?.loras?.max_items ?? 8;
const scaleSpec = () => state.params?.loras?.items?.scale ?? { minimum: -10, maximum: 10 };

function loraLabel(file) {
  const ranks = file.ranks?.length ? `, rank ${file.ranks.join("/")}` : "";
  return `${file.name.replace(/\.safetensors$/, "")} (${file.format}${ranks})`;
}

function addLora(name = state.loras[0]?.name, scale = 1) {
  if (!name || state.loraRows.length >= loraLimit()) return;
  state.loraRows.push({ id: ++loraCounter, name, scale: String(scale) });
  clearLoraErrors();
  renderLoras();
}

function removeLora(index) {
  state.loraRows.splice(index, 1);
  clearLoraErrors();
  renderLoras();
  announce("LoRA removed.");
  const rows = $("lora-rows").children;
  (rows[Math.min(index, rows.length - 1)]?.querySelector(".lora-remove") || $("lora-add")).focus();
}

function renderLoras() {
  const list = $("lora-rows");
  list.replaceChildren();
  const { minimum, maximum } = scaleSpec();
  state.loraRows.forEach((row, i) => {
    const n = i + 1;
    const fileId = `lora-file-${row.id}`;
    const scaleId = `lora-scale-${row.id}`;
    const select = el("select", { id: fileId, class: "lora-file", "aria-describedby": "lora-error" });
    for (const f of state.loras) select.append(el("option", { value: f.name, text: loraLabel(f) }));
    select.value = row.name;
    select.addEventListener("change", () => { row.name = select.value; clearLoraErrors(); });
    const scale = el("input", {
      id: scaleId, class: "lora-scale", type: "number", inputmode: "decimal", min: minimum, max: maximum,
      step: 0.05, value: row.scale, "aria-describedby": "lora-hint lora-error",
    });
    scale.addEventListener("input", () => { row.scale = scale.value; clearLoraErrors(); });
    list.append(el("li", { class: "lora-row" },
      el("div", { class: "field" }, el("label", { for: fileId, text: `LoRA ${n}` }), select),
      el("div", { class: "field" }, el("label", { for: scaleId, text: `Scale ${n}` }), scale),
      el("button", {
        type: "button", class: "icon lora-remove", "aria-label": `Remove LoRA ${n}`, text: "×",
        onclick: () => removeLora(i),
      })));
  });
  const full = state.loraRows.length >= loraLimit();
  $("lora-add").disabled = full;
  $("lora-add").textContent = full ? `At most ${loraLimit()} LoRAs`
    : state.loraRows.length ? "Add another LoRA" : "Add a LoRA";
}

function clearLoraErrors() {
  $("lora-error").textContent = "";
  $("lora-add").removeAttribute("aria-invalid");
  for (const node of $("lora-rows").querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

/** An error naming `loras` or `loras[i].path|scale`, at that row's control; true if it named one. */
function showLoraError(message, field) {
  if ($("lora-field").hidden) {
    $("form-error").textContent = message;
    return false;
  }
  $("lora-error").textContent = message;
  const m = /^loras\[(\d+)\](?:\.([a-z_]+))?$/.exec(field);
  const row = m ? $("lora-rows").children[Number(m[1])] : null;
  const control = row?.querySelector(m[2] === "scale" ? ".lora-scale" : ".lora-file") || $("lora-add");
  control.setAttribute("aria-invalid", "true");
  if (!control.disabled) control.focus({ preventScroll: false });
  control.scrollIntoView({ block: "center", behavior: "smooth" });
  return true;
}

/** The picker's rows as the request's `loras` (none when the service serves no LoRAs). */
function loraBody() {
  if ($("lora-field").hidden) return [];
  const { minimum, maximum } = scaleSpec();
  return state.loraRows.map((row, i) => {
    const input = $(`lora-scale-${row.id}`);
    if (input.validity.badInput || input.value.trim() === "") {
      throw new ClientError(`loras[${i}].scale`, `must be a number from ${minimum} to ${maximum}`);
    }
    return { path: row.name, scale: Number(input.value) };
  });
}

// --- references ----------------------------------------------------------------------------------------

function refsLimit() {
  return state.mode === "edit" ? 1 : (state.params?.reference_image_urls?.max_items ?? 10);
}

function addFiles(fileList) {
  clearFieldError("ref-files");
  const files = Array.from(fileList);
  const images = files.filter((f) => /^image\/(png|jpeg|webp)$/.test(f.type) || /\.(png|jpe?g|webp)$/i.test(f.name));
  const notes = [];
  if (images.length < files.length) notes.push("Only PNG, JPEG and WebP images can be references.");
  let take = images;
  if (state.mode === "edit") {
    if (images.length > 1) notes.push("Edit takes one image: the first one was used. Personalize takes several.");
    take = images.slice(0, 1);
    if (take.length) for (const ref of state.refs.splice(0)) dropRef(ref);
  } else {
    const room = refsLimit() - state.refs.length;
    if (images.length > room) notes.push(`At most ${refsLimit()} references: ${images.length - Math.max(room, 0)} left out.`);
    take = images.slice(0, Math.max(room, 0));
  }
  for (const file of take) {
    const ref = { id: ++refCounter, name: file.name, thumb: URL.createObjectURL(file), status: "uploading" };
    state.refs.push(ref);
    measure(ref);
    upload(ref, file);
  }
  if (notes.length) $("refs-error").textContent = notes.join(" ");
  if (take.length) announce(`${take.length === 1 ? "One image" : `${take.length} images`} uploading.`);
  setMode(state.mode);
}

async function upload(ref, blob) {
  try {
    ref.url = await api.upload(blob, ref.name || "reference.png");
    ref.status = "ready";
    announce(`${ref.name || "Image"} uploaded.`);
  } catch (err) {
    ref.status = "error";
    ref.error = err.message;
    if (err.status === 401) handleApiError(err);
    else showError(err.message, "file");
  }
  renderRefs();
}

function measure(ref) {
  const img = new Image();
  img.onload = () => {
    ref.ratio = img.naturalWidth / img.naturalHeight;
    updateSize();
  };
  img.src = ref.thumb;
}

function dropRef(ref) {
  if (ref.thumb?.startsWith("blob:")) URL.revokeObjectURL(ref.thumb);
}

function moveRef(from, to, focusSelector) {
  if (to < 0 || to >= state.refs.length || from === to) return;
  const [ref] = state.refs.splice(from, 1);
  state.refs.splice(to, 0, ref);
  renderRefs();
  announce(`Reference moved to position ${to + 1} of ${state.refs.length}.`);
  if (focusSelector) {
    // the same button on the moved image; at either end, the other direction's
    const item = $("refs").children[to];
    const other = focusSelector === ".ref-earlier" ? ".ref-later" : ".ref-earlier";
    const target = [focusSelector, other, ".ref-remove"].map((s) => item?.querySelector(s)).find((b) => b && !b.disabled);
    target?.focus();
  }
}

function removeRef(index) {
  const [ref] = state.refs.splice(index, 1);
  dropRef(ref);
  clearFieldError("ref-files");
  setMode(state.mode);
  announce("Reference removed.");
  const next = $("refs").children[Math.min(index, state.refs.length - 1)];
  (next?.querySelector(".ref-remove") || $("ref-files")).focus();
}

function renderRefs() {
  const list = $("refs");
  list.replaceChildren();
  const n = state.refs.length;
  state.refs.forEach((ref, i) => {
    const label = `reference ${i + 1}${ref.name ? ` (${ref.name})` : ""}`;
    const status = ref.status === "uploading" ? "Uploading…" : ref.status === "error" ? ref.error : "";
    const li = el("li", { class: `ref ${ref.status}`, draggable: n > 1 ? "true" : false, "data-index": i },
      el("img", { src: ref.thumb, alt: `Reference ${i + 1}${ref.name ? `: ${ref.name}` : ""}` }),
      el("span", { class: "ref-pos", "aria-hidden": "true", text: String(i + 1) }),
      status ? el("span", { class: "ref-status", text: status }) : null,
      el("span", { class: "ref-tools" },
        n > 1 ? el("button", {
          type: "button", class: "icon ref-earlier", "aria-label": `Move ${label} earlier`, disabled: i === 0,
          text: "←", onclick: () => moveRef(i, i - 1, ".ref-earlier"),
        }) : null,
        n > 1 ? el("button", {
          type: "button", class: "icon ref-later", "aria-label": `Move ${label} later`, disabled: i === n - 1,
          text: "→", onclick: () => moveRef(i, i + 1, ".ref-later"),
        }) : null,
        el("button", {
          type: "button", class: "icon ref-remove", "aria-label": `Remove ${label}`, text: "×",
          onclick: () => removeRef(i),
        })));
    li.addEventListener("dragstart", (e) => {
      e.dataTransfer.setData("application/x-hidream-ref", String(i));
      e.dataTransfer.effectAllowed = "move";
      li.classList.add("dragging");
    });
    li.addEventListener("dragend", () => li.classList.remove("dragging"));
    li.addEventListener("dragover", (e) => {
      if (e.dataTransfer.types.includes("application/x-hidream-ref")) {
        e.preventDefault();
        e.stopPropagation();
      }
    });
    li.addEventListener("drop", (e) => {
      const from = e.dataTransfer.getData("application/x-hidream-ref");
      if (from === "") return;
      e.preventDefault();
      e.stopPropagation();
      moveRef(Number(from), i);
    });
    list.append(li);
  });
  const one = state.mode !== "text-to-image" && n === 1;
  $("keep-aspect-field").hidden = !one;
  renderLayout();
  updateSize();
}

/** One box input per reference, in their order (a box follows its reference when it moves). */
function renderLayout() {
  const max = state.params?.layout_boxes?.max_items;
  const boxes = $("layout-boxes");
  boxes.replaceChildren();
  const n = state.refs.length;
  $("layout-field").hidden = !max || state.mode === "text-to-image" || n === 0 || n > max;
  state.refs.forEach((ref, i) => {
    const id = `layout-${i}`;
    boxes.append(el("div", { class: "field inline" },
      el("label", { for: id, text: `Reference ${i + 1}` }),
      el("input", {
        id, type: "text", inputmode: "decimal", value: ref.box || "", placeholder: "x1, y1, x2, y2",
        "aria-describedby": "layout-hint layout-error", autocomplete: "off",
        oninput: (e) => { ref.box = e.target.value; clearFieldError("layout-0"); e.target.removeAttribute("aria-invalid"); },
      })));
  });
}

/** The layout_boxes of the form: none when every box is empty; a ClientError for a half-filled or bad one. */
function layoutBody() {
  if ($("layout-field").hidden) return null;
  const texts = state.refs.map((r) => (r.box || "").trim());
  if (texts.every((t) => t === "")) return null;
  return texts.map((text, i) => {
    const parts = text.split(/[\s,]+/).filter(Boolean).map(Number);
    if (parts.length !== 4 || parts.some((v) => !Number.isFinite(v))) {
      throw new ClientError(`layout_boxes[${i}]`, `reference ${i + 1} needs a box of four numbers x1, y1, x2, y2 `
        + "(fill every box, or none)");
    }
    return parts;
  });
}

function setupDropzone() {
  const zone = $("refs-field");
  let depth = 0;
  const isFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types).includes("Files");
  zone.addEventListener("dragenter", (e) => {
    if (!isFiles(e)) return;
    depth += 1;
    $("dropzone").classList.add("over");
  });
  zone.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) $("dropzone").classList.remove("over");
  });
  zone.addEventListener("dragover", (e) => {
    if (isFiles(e)) {
      e.preventDefault();
      e.dataTransfer.dropEffect = "copy";
    }
  });
  zone.addEventListener("drop", (e) => {
    depth = 0;
    $("dropzone").classList.remove("over");
    if (!e.dataTransfer?.files?.length) return;
    e.preventDefault();
    addFiles(e.dataTransfer.files);
  });
  $("ref-files").addEventListener("change", () => {
    addFiles($("ref-files").files);
    $("ref-files").value = "";
  });
  // a file dropped outside the zone must not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
}

// --- submitting ----------------------------------------------------------------------------------------

function readNumber(id, field) {
  const input = $(id);
  if (input.validity.badInput) throw new ClientError(field, "must be a number");
  if (input.value.trim() === "") return undefined;
  return Number(input.value);
}

function requestBody() {
  const body = {
    model: state.models.length > 1 ? $("model").value : state.models[0].id,
    prompt: $("prompt").value,
  };
  const checked = document.querySelector('input[name="size"]:checked');
  if (checked.value === "custom") {
    if ($("width").validity.badInput || $("height").validity.badInput) {
      throw new ClientError("image_size", "width and height must be numbers");
    }
    body.image_size = `${$("width").value.trim()}x${$("height").value.trim()}`;
  } else {
    body.image_size = checked.value;
  }
  const steps = readNumber("steps", "num_inference_steps");
  if (steps !== undefined) body.num_inference_steps = steps;
  const guidance = readNumber("guidance", "guidance_scale");
  if (guidance !== undefined) body.guidance_scale = guidance;
  body.output_format = $("format").value;
  if ($("seed-random").checked) body.seed = -1;
  else {
    const seed = readNumber("seed", "seed");
    body.seed = seed === undefined ? -1 : seed;
  }
  if (nativeChecked()) body.snap_to_native = true;
  if (!$("refine-field").hidden && $("refine").checked) body.refine_prompt = true;
  if (!$("seams-field").hidden && $("seams").checked) body.seam_smoothing = {};
  if (!$("cache-field").hidden && $("cache").checked) body.cache = "fast";
  const n = readNumber("num-images", "num_images");
  if (n !== undefined) body.num_images = n;
  if (state.mode !== "text-to-image") {
    const max = state.params?.reference_image_urls?.max_items ?? 10;
    if (state.refs.some((r) => r.status === "uploading")) {
      throw new ClientError("reference_image_urls", "wait until the uploads have finished");
    }
    if (state.refs.some((r) => r.status === "error")) {
      throw new ClientError("reference_image_urls", "remove the images that failed to upload");
    }
    const count = state.refs.length;
    if (state.mode === "edit" && count !== 1) {
      throw new ClientError("reference_image_urls", `edit takes exactly one reference image (got ${count})`);
    }
    if (state.mode === "personalization" && (count < 2 || count > max)) {
      throw new ClientError("reference_image_urls", `personalize takes 2 to ${max} reference images (got ${count})`);
    }
    body.reference_image_urls = state.refs.map((r) => r.url);
    if (count === 1) body.keep_original_aspect = $("keep-aspect").checked;
    const layout = layoutBody();
    if (layout) body.layout_boxes = layout;
  }
  const loras = loraBody();
  if (loras.length) body.loras = loras;
  return body;
}

async function submit(event) {
  event.preventDefault();
  if (state.run) return;
  clearErrors();
  $("result-error").textContent = "";
  let body;
  try {
    body = requestBody();
  } catch (err) {
    if (err instanceof ClientError) {
      showError(err.message, err.field);
      return;
    }
    throw err;
  }
  setBusy(true);
  let pred;
  try {
    pred = await api.submit(body, randomKey());
  } catch (err) {
    setBusy(false);
    handleApiError(err);
    return;
  }
  follow(pred);
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("generate").textContent = busy ? "Working…" : "Generate";
  $("gen-form").setAttribute("aria-busy", busy ? "true" : "false");
}

// --- a run: progress, previews, cancel -----------------------------------------------------------------

async function follow(pred) {
  if (state.run) state.run.abort.abort();
  const run = { id: pred.id, abort: new AbortController(), first: null };
  state.run = run;
  setBusy(true);
  $("run").hidden = false;
  $("result-error").textContent = "";
  $("cancel").disabled = false;
  $("cancel").textContent = "Cancel";
  $("run-detail").textContent = "";
  $("run-progress").removeAttribute("value");
  showStatus(pred.status);
  if (pred.progress) showProgress(pred.progress);
  clearStage(pred);
  const top = $("result").getBoundingClientRect().top;
  if (top > window.innerHeight * 0.6) $("result").scrollIntoView({ block: "start", behavior: "smooth" });
  let final;
  try {
    final = isTerminal(pred.status) ? pred : await api.follow(pred.id, {
      status: (s) => { if (state.run === run) showStatus(s); },
      progress: (p) => { if (state.run === run) showProgress(p); },
      preview: (p) => { if (state.run === run) showPreview(p); },
    }, run.abort.signal);
  } catch (err) {
    if (err.name === "AbortError") return;
    if (state.run === run) {
      state.run = null;
      setBusy(false);
      $("run").hidden = true;
      handleApiError(err, "result");
    }
    return;
  }
  if (state.run !== run) return;
  state.run = null;
  setBusy(false);
  $("run").hidden = true;
  showResult(final, true);
  refreshUsage();
  loadHistory(true);
}

function showStatus(status) {
  const text = {
    created: "Waiting in the queue…",
    processing: "Generating…",
    completed: "Done.",
    failed: "Stopped.",
  }[status] || status;
  $("run-status").textContent = text;
  if (status === "created") $("run-progress").removeAttribute("value");
}

function showProgress({ step, total, eta_s: eta }) {
  const run = state.run;
  if (!run || !total) return;
  const bar = $("run-progress");
  bar.max = total;
  bar.value = step;
  $("run-status").textContent = "Generating…";
  const now = performance.now();
  if (!run.first || step < run.first.step) run.first = { step, t: now };
  let left = typeof eta === "number" && Number.isFinite(eta) ? eta : null;
  if (left == null && step > run.first.step) {
    left = ((now - run.first.t) / 1000 / (step - run.first.step)) * (total - step);
  }
  const etaText = left == null ? "estimating the time left" : formatEta(left);
  $("run-detail").textContent = `Step ${step} of ${total} · ${etaText}`;
}

function showPreview({ step, image }) {
  if (!image) return;
  const img = $("result-image");
  img.src = image;
  img.alt = `Preview at step ${step}`;
  img.hidden = false;
  $("placeholder").hidden = true;
  $("stage").classList.add("previewing");
  $("result-caption").textContent = `Preview at step ${step}`;
}

function clearStage(pred) {
  state.current = null;
  $("stage").classList.remove("previewing");
  $("result-image").hidden = true;
  $("result-image").removeAttribute("src");
  $("placeholder").hidden = false;
  $("placeholder").textContent = "Working on it…";
  $("result-caption").textContent = pred?.input?.prompt ? `“${pred.input.prompt}”` : "";
  $("outputs").hidden = true;
  $("result-actions").hidden = true;
  $("result-meta").hidden = true;
}

async function cancelRun() {
  const run = state.run;
  if (!run) return;
  $("cancel").disabled = true;
  $("cancel").textContent = "Canceling…";
  try {
    await api.cancel(run.id);
    announce("Cancel requested.");
  } catch (err) {
    if (state.run !== run) return;
    $("cancel").disabled = false;
    $("cancel").textContent = "Cancel";
    const unsupported = err.status === 404 || err.status === 405;
    $("result-error").textContent = unsupported && !/prediction/.test(err.message)
      ? "This server cannot cancel predictions." : err.message;
  }
}

// --- the result ----------------------------------------------------------------------------------------

function showResult(pred, fresh = false) {
  state.current = pred;
  state.selected = 0;
  const inp = pred.input || {};
  if (typeof inp.seed === "number") {
    state.lastSeed = inp.seed;
    $("seed-reuse").disabled = false;
    $("seed-reuse").textContent = `Reuse last (${inp.seed})`;
  }
  $("stage").classList.remove("previewing");
  if (pred.status !== "completed") {
    $("result-image").hidden = true;
    $("placeholder").hidden = false;
    $("outputs").hidden = true;
    $("result-actions").hidden = true;
    if (pred.status === "failed") {
      const canceled = pred.error === "canceled";
      $("placeholder").textContent = canceled ? "Canceled." : "No image: the prediction failed.";
      $("result-error").textContent = canceled ? "Canceled. Nothing was charged."
        : `The prediction failed: ${pred.error || "no reason given"}`;
      if (fresh) announce(canceled ? "Canceled." : "The prediction failed.");
    } else {
      $("placeholder").textContent = "Still running.";
    }
    renderMeta(pred);
    return;
  }
  $("result-error").textContent = "";
  renderOutputs(pred);
  selectOutput(0);
  renderMeta(pred);
  $("result-actions").hidden = false;
  if (fresh) announce(pred.outputs.length > 1 ? `Done: ${pred.outputs.length} images.` : "Done: the image is ready.");
}

function renderOutputs(pred) {
  const box = $("outputs");
  box.replaceChildren();
  box.hidden = pred.outputs.length < 2;
  pred.outputs.forEach((url, i) => {
    box.append(el("button", {
      type: "button", class: "output-thumb", "aria-pressed": i === 0 ? "true" : "false",
      "aria-label": `Image ${i + 1} of ${pred.outputs.length}`, onclick: () => selectOutput(i),
    }, el("img", { src: local(url), alt: "" })));
  });
}

function selectOutput(i) {
  const pred = state.current;
  const url = local(pred.outputs[i]);
  state.selected = i;
  const img = $("result-image");
  const n = pred.outputs.length;
  img.src = url;
  img.alt = `Generated image${n > 1 ? ` ${i + 1} of ${n}` : ""} for the prompt: ${pred.input?.prompt ?? ""}`;
  img.hidden = false;
  $("placeholder").hidden = true;
  $("result-caption").textContent = pred.input?.prompt ? `“${pred.input.prompt}”` : "";
  for (const [j, b] of Array.from($("outputs").children).entries()) b.setAttribute("aria-pressed", String(i === j));
  const fmt = pred.input?.output_format || "png";
  const download = $("download");
  download.href = url;
  download.download = `hidream-${pred.id.slice(0, 8)}${n > 1 ? `-${i + 1}` : ""}.${fmt === "jpeg" ? "jpg" : fmt}`;
  download.textContent = `Download ${fmt.toUpperCase()}`;
  $("open-full").href = url;
}

function renderMeta(pred) {
  const inp = pred.input || {};
  const rows = [
    ["Mode", MODE_NAMES[inp.mode] || inp.mode],
    ["Made through", inp.surface && (SURFACE_NAMES[inp.surface] || inp.surface)],
    ["Refined prompt", inp.refined_prompt],
    ["Seam smoothing", inp.seam_smoothing && `steps ${inp.seam_smoothing.start}–${inp.seam_smoothing.end} of the schedule, ${inp.seam_smoothing.passes} passes`],
    ["Step cache", inp.cache],
    ["Warning", (pred.warnings || []).join(" ")],
    ["Size", inp.width && `${inp.width} × ${inp.height}`],
    ["Steps", inp.num_inference_steps],
    ["Guidance", inp.guidance_scale],
    ["Seed", inp.seed],
    ["Format", inp.output_format?.toUpperCase()],
    ["LoRAs", (inp.loras || []).map((l) => `${l.path.split("/").pop()} ×${l.scale}`).join(", ")],
    ["Model time", pred.timings?.inference != null ? `${(pred.timings.inference / 1000).toFixed(1)} s` : null],
    ["Status", pred.status === "failed" && pred.error === "canceled" ? "canceled" : pred.status],
  ];
  const dl = $("result-meta");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    if (v == null || v === "") continue;
    dl.append(el("div", {}, el("dt", { text: k }), el("dd", { text: String(v) })));
  }
  dl.hidden = false;
}

async function useAsReference() {
  const pred = state.current;
  if (!pred?.outputs?.length) return;
  const url = local(pred.outputs[state.selected]);
  const fmt = pred.input?.output_format || "png";
  for (const ref of state.refs.splice(0)) dropRef(ref);
  const ref = { id: ++refCounter, name: `result.${fmt === "jpeg" ? "jpg" : fmt}`, thumb: url, status: "uploading" };
  state.refs.push(ref);
  measure(ref);
  setMode("edit");
  $("prompt").focus();
  $("refs-field").scrollIntoView({ block: "nearest", behavior: "smooth" });
  announce("The image is now the reference of an edit. Describe the change in the prompt.");
  let blob = null;
  try {
    const response = await fetch(url);
    if (response.ok) blob = await response.blob();
  } catch {
    // another origin without CORS (an object store): send its URL for the server to fetch instead
  }
  if (blob) {
    await upload(ref, new File([blob], ref.name, { type: blob.type || `image/${fmt}` }));
  } else {
    ref.url = pred.outputs[state.selected];
    ref.status = "ready";
    renderRefs();
  }
}

// --- history -------------------------------------------------------------------------------------------

let historyLoading = null;

async function loadHistory(reset) {
  if (historyLoading) {
    if (!reset) return;
    historyLoading.abort = true;
  }
  const token = { abort: false };
  historyLoading = token;
  $("history-error").textContent = "";
  $("history-more").disabled = true;
  try {
    const page = await api.predictions(HISTORY_PAGE, reset ? null : state.historyCursor);
    if (token.abort) return;
    const list = $("history-list");
    if (reset) list.replaceChildren();
    for (const pred of page.items) list.append(historyCard(pred));
    state.historyCursor = page.next_cursor;
    $("history-more").hidden = !page.next_cursor;
    $("history-empty").hidden = list.children.length > 0;
  } catch (err) {
    if (token.abort) return;
    if (err.status === 401) handleApiError(err);
    else $("history-error").textContent = `The history could not be loaded: ${err.message}`;
  } finally {
    if (historyLoading === token) historyLoading = null;
    $("history-more").disabled = false;
  }
}

function historyCard(pred) {
  const inp = pred.input || {};
  const canceled = pred.status === "failed" && pred.error === "canceled";
  const status = canceled ? "canceled" : pred.status;
  const thumb = pred.status === "completed" && pred.outputs.length
    ? el("img", { src: local(pred.outputs[0]), alt: "", loading: "lazy" })
    : el("span", { class: `thumb-status ${status}`, "aria-hidden": "true", text: status });
  const facts = [MODE_NAMES[inp.mode] || inp.mode, inp.width && `${inp.width}×${inp.height}`,
    inp.num_images > 1 ? `${inp.num_images} images` : null,
    inp.loras?.length ? `${inp.loras.length} LoRA${inp.loras.length > 1 ? "s" : ""}` : null,
    status, ago(pred.created_at)].filter(Boolean);
  const id = `card-${pred.id}`;
  return el("li", { class: "card", "data-id": pred.id },
    el("button", {
      type: "button", class: "card-open", onclick: () => reopen(pred),
      "aria-labelledby": `${id}-verb ${id}-prompt`, "aria-describedby": `${id}-meta`,
    },
      el("span", { class: "card-thumb" }, thumb),
      el("span", { class: "card-text" },
        el("span", { class: "visually-hidden", id: `${id}-verb`, text: "Reopen:" }),
        el("span", { class: "card-prompt", id: `${id}-prompt`, text: inp.prompt || "(no prompt)" }),
        el("span", { class: "card-meta", id: `${id}-meta`, text: facts.join(" · ") }))));
}

async function reopen(pred) {
  clearErrors();
  const inp = pred.input || {};
  $("prompt").value = inp.prompt || "";
  $("prompt").dispatchEvent(new Event("input"));
  const size = inp.image_size;
  const presets = state.params.image_size.presets;
  if (typeof size === "string" && presets[size]) {
    $(`size-${size}`).checked = true;
  } else if (inp.width && inp.height) {
    $("size-custom").checked = true;
    const custom = typeof size === "object" && size ? size : null;
    $("width").value = custom?.width ?? inp.width;
    $("height").value = custom?.height ?? inp.height;
  }
  for (const [id, value] of [["steps", inp.num_inference_steps], ["guidance", inp.guidance_scale],
    ["num-images", inp.num_images]]) {
    if (value == null) continue;
    $(id).value = value;
    $(id).dispatchEvent(new Event("input"));
  }
  if (inp.output_format) $("format").value = inp.output_format;
  if (typeof inp.seed === "number") {
    $("seed-random").checked = false;
    $("seed").disabled = false;
    $("seed").value = inp.seed;
  }
  for (const ref of state.refs.splice(0)) dropRef(ref);
  const urls = inp.reference_image_urls || [];
  let skipped = 0;
  urls.forEach((url, i) => {
    if (/^https?:/.test(url)) {
      const box = inp.layout_boxes?.[i];
      const ref = { id: ++refCounter, name: "", thumb: local(url), url, status: "ready", box: box ? box.join(", ") : "" };
      state.refs.push(ref);
      measure(ref);
    } else {
      skipped += 1;
    }
  });
  setMode(inp.mode && MODE_NAMES[inp.mode] ? inp.mode : "text-to-image");
  $("keep-aspect").checked = Boolean(inp.keep_original_aspect);
  $("native-size").checked = Boolean(inp.snap_to_native);
  $("refine").checked = Boolean(inp.refine_prompt);
  $("seams").checked = Boolean(inp.seam_smoothing);
  $("cache").checked = inp.cache === "fast";
  const served = (inp.loras || []).filter((l) => state.loras.some((f) => f.name === l.path));
  state.loraRows = served.map((l) => ({ id: ++loraCounter, name: l.path, scale: String(l.scale) }));
  renderLoras();
  const missing = (inp.loras || []).length - served.length;
  if (missing && !$("lora-field").hidden) {
    $("lora-error").textContent = `${missing} LoRA${missing > 1 ? "s" : ""} of that request ${missing > 1 ? "are" : "is"} `
      + "not in this service's list (a URL, or a file since removed): add them again.";
  }
  updateSize();
  updateCost();
  if (skipped) {
    $("refs-error").textContent = `${skipped} reference${skipped > 1 ? "s were" : " was"} sent as data: URIs, `
      + "which the history does not keep: add them again.";
  }
  if (state.run) {
    // a run is on the stage: it stays there; only the parameters come back
    announce("Parameters restored from the history; the current run goes on.");
  } else {
    $("result-error").textContent = "";
    if (isTerminal(pred.status)) showResult(pred);
    else follow(pred);
    announce("Parameters restored from the history.");
  }
  $("gen-title").scrollIntoView({ block: "start", behavior: "smooth" });
  $("prompt").focus({ preventScroll: true });
}

// --- start ---------------------------------------------------------------------------------------------

function start() {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    useKey($("api-key").value);
  });
  $("api-key").addEventListener("input", () => {
    $("api-key").removeAttribute("aria-invalid");
    $("api-key-error").textContent = "";
  });
  $("change-key").addEventListener("click", () => openKeyPanel());
  $("key-cancel").addEventListener("click", () => {
    $("key-panel").hidden = true;
    $("change-key").focus();
  });
  $("key-forget").addEventListener("click", () => {
    saveKey("");
    $("key-forget").hidden = true;
    announce("The saved key was removed from this browser.");
  });
  $("gen-form").addEventListener("submit", submit);
  $("lora-add").addEventListener("click", () => {
    addLora();
    const rows = $("lora-rows").children;
    rows[rows.length - 1]?.querySelector(".lora-file")?.focus();
  });
  $("cancel").addEventListener("click", cancelRun);
  $("use-reference").addEventListener("click", useAsReference);
  $("history-refresh").addEventListener("click", () => loadHistory(true));
  $("history-more").addEventListener("click", () => loadHistory(false));
  $("result-image").addEventListener("error", () => {
    if (state.current && !$("result-image").hidden && $("result-image").src) {
      $("result-error").textContent = "The image could not be loaded (its link may have expired).";
    }
  });
  setupDropzone();

  const key = savedKey();
  if (key) useKey(key, { fromStorage: true });
  else openKeyPanel();
}

start();
