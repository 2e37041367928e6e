// comfyui-quantizer: live view on the "Quantize Model (8-bit)" node.
//
// The server sends three websocket events per run (see nodes/events.py):
//   comfyui_quantizer.start {node, source, format}          -> clear the view
//   comfyui_quantizer.layer {node, done, total, current, row} -> status line, one table row
//   comfyui_quantizer.done  {node, ...summary, rows}         -> summary line (and full table)
// The node's `executed` output carries the same summary, so the view is restored when the
// events were missed (page reloaded, cached run). Public extension API only: app.registerExtension,
// api.addEventListener and a DOM widget.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "QuantizerQuantize";
const EVENT_START = "comfyui_quantizer.start";
const EVENT_LAYER = "comfyui_quantizer.layer";
const EVENT_DONE = "comfyui_quantizer.done";
const UI_KEY = "comfyui_quantizer";
const WIDGET = "quantizer_live";
const MIN_WIDTH = 520;
const MIN_HEIGHT = 260;

const STYLE = `
.cq-view { font: 11px/1.35 ui-monospace, monospace; color: var(--fg-color, #ddd);
  display: flex; flex-direction: column; gap: 4px; width: 100%; height: 100%;
  box-sizing: border-box; overflow: hidden; }
.cq-status { flex: none; white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
  opacity: .85; }
.cq-scroll { flex: 1 1 0; overflow: auto; min-height: 0;
  border: 1px solid var(--border-color, #444); border-radius: 4px; }
.cq-table { border-collapse: collapse; width: 100%; }
.cq-table th, .cq-table td { padding: 1px 6px; text-align: right; white-space: nowrap; }
.cq-table th:first-child, .cq-table td:first-child { text-align: left; max-width: 240px;
  overflow: hidden; text-overflow: ellipsis; }
.cq-table thead th { position: sticky; top: 0; background: var(--comfy-menu-bg, #222); }
.cq-summary { flex: none; white-space: pre-wrap; }
.cq-summary.cq-warn { color: #f0a040; }
`;

function ensureStyle() {
  if (document.getElementById("cq-style")) return;
  const style = document.createElement("style");
  style.id = "cq-style";
  style.textContent = STYLE;
  document.head.append(style);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmtDb(value) {
  if (value === null || value === undefined) return "-";
  if (value === "inf") return "exact";
  return Number(value).toFixed(2);
}

function fmtMb(bytes) {
  return `${(bytes / 1e6).toFixed(1)} MB`;
}

class LiveView {
  constructor(node) {
    ensureStyle();
    this.root = el("div", "cq-view");
    this.root.dataset.cqNode = String(node.id);
    this.status = el("div", "cq-status", "idle");
    const scroll = el("div", "cq-scroll");
    this.table = el("table", "cq-table");
    const head = el("thead");
    const headRow = el("tr");
    for (const title of ["layer", "format", "SQNR dB", "ms"]) headRow.append(el("th", "", title));
    head.append(headRow);
    this.body = el("tbody");
    this.table.append(head, this.body);
    scroll.append(this.table);
    this.summary = el("div", "cq-summary");
    this.root.append(this.status, scroll, this.summary);
    this.widget = node.addDOMWidget(WIDGET, "quantizer-live", this.root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => MIN_HEIGHT,
    });
    this.widget.serialize = false; // a view, not a value: keep it out of saved workflows
    // Wide enough for the table's four columns.
    if (node.size[0] < MIN_WIDTH) node.setSize([MIN_WIDTH, node.size[1]]);
  }

  reset(detail) {
    this.body.replaceChildren();
    this.summary.textContent = "";
    this.summary.classList.remove("cq-warn");
    this.status.textContent = `quantizing ${detail.source ?? ""} to ${detail.format ?? ""}`;
  }

  addRow(row) {
    const tr = el("tr");
    tr.dataset.layer = row.layer;
    // Output-space SQNR when it was measured (learned rounding), else the weight SQNR (w).
    const sqnr =
      row.output_sqnr_db !== null && row.output_sqnr_db !== undefined
        ? fmtDb(row.output_sqnr_db)
        : `${fmtDb(row.weight_sqnr_db)} w`;
    const cells = [row.layer, row.format, sqnr, row.time_ms === null ? "-" : String(row.time_ms)];
    for (const text of cells) tr.append(el("td", "", text));
    tr.firstChild.title = row.layer;
    this.body.append(tr);
  }

  progress(detail) {
    this.status.textContent = `${detail.done}/${detail.total}  ${detail.current}`;
    if (detail.row) this.addRow(detail.row);
  }

  finish(summary) {
    if (this.body.childElementCount !== summary.rows.length) {
      this.body.replaceChildren();
      for (const row of summary.rows) this.addRow(row);
    }
    const mean =
      summary.mean_output_sqnr_db !== null
        ? `mean output SQNR ${fmtDb(summary.mean_output_sqnr_db)} dB`
        : `mean weight SQNR ${fmtDb(summary.mean_weight_sqnr_db)} dB`;
    const lines = [
      `${summary.architecture ?? "architecture not detected"}: ` +
        `${summary.quantized_layers} layers quantized, ${summary.kept_tensors} tensors kept`,
      `size ${fmtMb(summary.bytes_before)} -> ${fmtMb(summary.bytes_after)}; ${mean}`,
      summary.loadability,
      ...summary.notes,
    ];
    this.status.textContent = `done in ${summary.elapsed_s ?? "?"} s`;
    this.summary.textContent = lines.join("\n");
    this.summary.classList.toggle("cq-warn", !summary.stock_loadable);
    this.summary.dataset.stockLoadable = String(summary.stock_loadable);
  }
}

function viewOf(node) {
  if (!node || node.comfyClass !== NODE_TYPE) return null;
  node.cqView ??= new LiveView(node);
  return node.cqView;
}

function viewFor(nodeId) {
  return viewOf(app.graph?.getNodeById(Number(nodeId)) ?? app.graph?.getNodeById(nodeId));
}

app.registerExtension({
  name: "comfyui_quantizer.LiveView",

  nodeCreated(node) {
    viewOf(node);
  },

  setup() {
    api.addEventListener(EVENT_START, ({ detail }) => viewFor(detail.node)?.reset(detail));
    api.addEventListener(EVENT_LAYER, ({ detail }) => viewFor(detail.node)?.progress(detail));
    api.addEventListener(EVENT_DONE, ({ detail }) => viewFor(detail.node)?.finish(detail));
    api.addEventListener("executed", ({ detail }) => {
      const summary = detail?.output?.[UI_KEY]?.[0];
      if (summary) viewFor(detail.node)?.finish(summary);
    });
  },
});
