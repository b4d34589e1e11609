// lhcnet serve: the page. Plain JavaScript, no build step, nothing loaded from elsewhere.
// Photos: each file is sent to POST /v1/predict on its own, then drawn with its faces boxed and
// one bar chart of the emotion probabilities per face. Webcam: frames are sent one after the
// other (at most MAX_FPS a second), and boxes and labels are drawn on a canvas over the video.
"use strict";

const MAX_FPS = 5;                 // webcam frames sent per second, at most
const CAM_WIDTH = 640;             // webcam frames are sent at most this wide
const COLORS = ["#00c853", "#2979ff", "#ff9100", "#d500f9", "#00b8d4", "#ffd600", "#ff1744"];
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("lhcnet-token") || "";
let limits = null;

// ---- talking to the server -------------------------------------------------------------------

async function api(path, body) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  let response;
  try {
    response = await fetch(path, body ? { method: "POST", body, headers } : { headers });
  } catch (err) {
    return { status: 0, detail: "cannot reach the server (is lhcnet serve still running?)" };
  }
  let data = null;
  try { data = await response.json(); } catch (err) { /* not JSON: a proxy or a crash */ }
  if (response.ok) return { status: response.status, data };
  if (response.status === 401) $("token-bar").hidden = false;
  return { status: response.status, detail: (data && data.detail) || response.statusText };
}

function explain(status, detail, name) {
  if (status === 413) return `${name} is too large: ${detail}`;
  if (status === 400 || status === 415 || status === 422) return `${name} could not be used: ${detail}`;
  if (status === 401) return `the server needs a token (${detail}); enter it above`;
  if (status === 504) return `the server took too long on ${name}: ${detail}`;
  if (status === 0) return detail;
  return `server error ${status} on ${name}: ${detail}`;
}

async function predict(blob, name) {
  const form = new FormData();
  form.append("image", blob, name);
  return api("/v1/predict", form);
}

// ---- drawing ---------------------------------------------------------------------------------

function percent(p) { return (100 * p).toFixed(1) + " %"; }

function drawBoxes(ctx, faces, scale) {
  const unit = Math.max(2, Math.round(Math.max(ctx.canvas.width, ctx.canvas.height) / 250));
  ctx.font = `600 ${6 * unit + 2}px system-ui, sans-serif`;
  ctx.textBaseline = "bottom";
  faces.forEach((face, i) => {
    const [x, y, w, h] = face.box.map((v) => v * scale);
    const color = COLORS[i % COLORS.length];
    ctx.lineWidth = unit;
    ctx.strokeStyle = color;
    ctx.strokeRect(x, y, w, h);
    const text = `${i + 1} ${face.label} ${percent(face.label_score)}`;
    const height = 6 * unit + 8;
    const top = y - height >= 0 ? y - height : y + h;
    ctx.fillStyle = color;
    ctx.fillRect(x - unit / 2, top, ctx.measureText(text).width + 2 * unit, height);
    ctx.fillStyle = "#000";
    ctx.fillText(text, x + unit / 2, top + height - 2);
  });
}

function faceCharts(faces) {
  return faces.map((face, i) => {
    const div = document.createElement("div");
    div.className = "face";
    div.dataset.face = String(i + 1);
    const title = document.createElement("h3");
    title.innerHTML = `<i style="background:${COLORS[i % COLORS.length]}"></i>`;
    title.append(`Face ${i + 1}: ${face.label} ${percent(face.label_score)}`);
    div.append(title);
    for (const [emotion, p] of Object.entries(face.scores)) {
      const bar = document.createElement("div");
      bar.className = "bar" + (emotion === face.label ? " top" : "");
      bar.dataset.emotion = emotion;
      bar.dataset.p = String(p);
      bar.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span>' +
                      '<span class="value"></span>';
      bar.querySelector(".name").textContent = emotion;
      bar.querySelector(".fill").style.width = (100 * p).toFixed(2) + "%";
      bar.querySelector(".value").textContent = percent(p);
      div.append(bar);
    }
    return div;
  });
}

function loadImage(blob) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot show this format"));
    img.src = URL.createObjectURL(blob);
  });
}

// ---- photos ----------------------------------------------------------------------------------

function card(name) {
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.status = "working";
  el.innerHTML = '<h2></h2><p class="message">analysing…</p><div class="card-body"></div>';
  el.querySelector("h2").textContent = name;
  $("results").prepend(el);
  return el;
}

function say(el, text, kind) {
  el.className = "message" + (kind ? " " + kind : "");
  el.textContent = text;
}

async function showPhoto(el, file, faces) {
  const body = el.querySelector(".card-body");
  let picture;
  try {
    const img = await loadImage(file);
    const scale = Math.min(1, 1600 / Math.max(img.naturalWidth, img.naturalHeight));
    picture = document.createElement("canvas");
    picture.width = Math.round(img.naturalWidth * scale);
    picture.height = Math.round(img.naturalHeight * scale);
    const ctx = picture.getContext("2d");
    ctx.drawImage(img, 0, 0, picture.width, picture.height);
    drawBoxes(ctx, faces, scale);
    URL.revokeObjectURL(img.src);
  } catch (err) {  // e.g. a TIFF: the server reads it, the browser cannot; show the server's drawing
    const form = new FormData();
    form.append("image", file, file.name);
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const response = await fetch("/v1/annotate?format=png", { method: "POST", body: form, headers });
    if (!response.ok) throw new Error(`the annotated image could not be fetched (${response.status})`);
    picture = await loadImage(await response.blob());
  }
  picture.classList.add("photo");
  const charts = document.createElement("div");
  charts.className = "faces";
  charts.append(...faceCharts(faces));
  body.append(picture, charts);
}

async function analyse(file) {
  const el = card(file.name);
  const message = el.querySelector(".message");
  if (limits && file.size > limits.max_upload_bytes) {
    el.dataset.status = "error";
    const mb = (bytes) => (bytes / 1e6).toFixed(1) + " MB";
    return say(message, explain(413, `${mb(file.size)} is above the server's ` +
                                     `${mb(limits.max_upload_bytes)} limit`, file.name), "error");
  }
  const result = await predict(file, file.name);
  if (!result.data) {
    el.dataset.status = "error";
    return say(message, explain(result.status, result.detail, file.name), "error");
  }
  const faces = result.data[0].faces;
  el.dataset.status = faces.length ? "done" : "no-face";
  say(message, faces.length
    ? `${faces.length} face${faces.length > 1 ? "s" : ""} found`
    : "no face found (the detector looks for frontal faces of at least 48 pixels)",
      faces.length ? "" : "warn");
  await showPhoto(el, file, faces);
}

async function analyseAll(files) {
  for (const file of files) {  // one after the other: the server is serial too
    try {
      await analyse(file);
    } catch (err) {
      const el = $("results").querySelector(".card");
      el.dataset.status = "error";
      say(el.querySelector(".message"), `${file.name}: ${err.message}`, "error");
    }
  }
}

// ---- webcam ----------------------------------------------------------------------------------

const cam = { stream: null, running: false, done: [] };

function camSay(text, kind) { say($("cam-message"), text, kind); }

async function startWebcam() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return camSay("browsers allow the webcam only on https or on this computer's own address: " +
                  "open http://127.0.0.1:<port>/ or http://localhost:<port>/", "error");
  }
  try {
    cam.stream = await navigator.mediaDevices.getUserMedia(
      { video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
  } catch (err) {
    const why = err.name === "NotAllowedError" ? "permission to use the camera was refused"
      : err.name === "NotFoundError" ? "no camera found" : `${err.name}: ${err.message}`;
    return camSay("cannot start the webcam: " + why, "error");
  }
  const video = $("cam-video");
  video.srcObject = cam.stream;
  await video.play();
  cam.running = true;
  cam.done = [];
  $("cam-start").disabled = true;
  $("cam-stop").disabled = false;
  camSay("webcam running");
  camLoop();
}

function stopWebcam() {
  cam.running = false;
  if (cam.stream) cam.stream.getTracks().forEach((track) => track.stop());
  cam.stream = null;
  $("cam-video").srcObject = null;
  $("cam-start").disabled = false;
  $("cam-stop").disabled = true;
  $("cam-fps").textContent = "– frames/s";
  camSay("webcam stopped");
}

function frameBlob(video) {
  const scale = Math.min(1, CAM_WIDTH / video.videoWidth);
  const frame = document.createElement("canvas");
  frame.width = Math.round(video.videoWidth * scale);
  frame.height = Math.round(video.videoHeight * scale);
  frame.getContext("2d").drawImage(video, 0, 0, frame.width, frame.height);
  return new Promise((resolve) => frame.toBlob((blob) => resolve([blob, scale]), "image/jpeg", 0.85));
}

function showCamFaces(faces, scale) {
  const video = $("cam-video"), overlay = $("cam-overlay");
  overlay.width = video.videoWidth;
  overlay.height = video.videoHeight;
  const ctx = overlay.getContext("2d");
  ctx.clearRect(0, 0, overlay.width, overlay.height);
  drawBoxes(ctx, faces, 1 / scale);
  overlay.dataset.faces = String(faces.length);
  $("cam-faces").replaceChildren(...faceCharts(faces));
}

async function camLoop() {
  const video = $("cam-video");
  while (cam.running) {
    const started = performance.now();
    if (video.videoWidth) {
      const [blob, scale] = await frameBlob(video);
      const result = await predict(blob, "webcam.jpg");
      if (!cam.running) break;
      if (result.data) {
        const faces = result.data[0].faces;
        showCamFaces(faces, scale);
        camSay(faces.length ? "" : "no face in view", faces.length ? "" : "warn");
        // the rate over the last 3 s, from the moments the answered frames were taken
        cam.done = cam.done.filter((t) => started - t < 3000).concat(started);
        if (cam.done.length > 1) {
          const span = (started - cam.done[0]) / 1000;
          $("cam-fps").textContent = ((cam.done.length - 1) / span).toFixed(1) + " frames/s";
        }
      } else {
        camSay(explain(result.status, result.detail, "the webcam frame"), "error");
        if (result.status === 401) return stopWebcam();
      }
    }
    const wait = 1000 / MAX_FPS - (performance.now() - started);
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, wait)));
  }
}

// ---- page ------------------------------------------------------------------------------------

function showTab(name) {
  for (const tab of ["photos", "webcam"]) {
    $(tab).hidden = tab !== name;
    $("tab-" + tab).setAttribute("aria-selected", String(tab === name));
  }
  if (name !== "webcam" && cam.running) stopWebcam();
}

async function showModel() {
  const result = await api("/v1/model");
  if (!result.data) {
    $("model-info").textContent = explain(result.status, result.detail, "/v1/model");
    return;
  }
  const model = result.data;
  limits = model.limits;
  const accuracy = Object.entries(model.accuracy)
    .map(([split, value]) => ` · ${(100 * value).toFixed(2)} % on ${split}`).join("");
  $("model-info").textContent = `model ${model.name}${accuracy} · face detector ${model.detector}` +
    ` · ${model.classes.length} classes · uploads up to ${(limits.max_upload_bytes / 1e6).toFixed(0)} MB`;
}

function setup() {
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromUrl) {  // #token=... : a fragment never reaches the server's logs
    token = fromUrl;
    sessionStorage.setItem("lhcnet-token", token);
    history.replaceState(null, "", location.pathname);
  }
  $("token-bar").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token-input").value.trim();
    sessionStorage.setItem("lhcnet-token", token);
    $("token-bar").hidden = true;
    showModel();
  });
  $("tab-photos").addEventListener("click", () => showTab("photos"));
  $("tab-webcam").addEventListener("click", () => showTab("webcam"));
  $("file-input").addEventListener("change", (event) => analyseAll([...event.target.files]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    analyseAll([...event.dataTransfer.files]);
  });
  $("cam-start").addEventListener("click", startWebcam);
  $("cam-stop").addEventListener("click", stopWebcam);
  showModel();
}

setup();
