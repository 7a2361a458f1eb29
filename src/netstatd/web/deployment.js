// The Deployment view: deploy/*.yaml as the agent ships them (GET api/deployment), so this page and
// `kubectl apply -f deploy/netstatd.yaml` always agree. Commands are the "# $ " lines of the manifests.

import { contains } from "./filters.js";
import { el } from "./dom.js";

let loaded = null; // the api/deployment answer once fetched

export async function loadDeployment() {
  if (loaded) return loaded;
  const resp = await fetch(new URL("api/deployment", window.location.href));
  if (!resp.ok) throw new Error(`api/deployment: HTTP ${resp.status}`);
  loaded = await resp.json();
  return loaded;
}

// Rows of the resources grid: one per manifest document.
export function deploymentRows(_store, f) {
  const all = [];
  for (const file of loaded?.files || []) {
    for (const d of file.documents) {
      all.push({ id: `${file.path}|${d.kind}|${d.name}`, file: file.path, kind: d.kind, name: d.name, namespace: d.namespace, ports: d.ports });
    }
  }
  const rows = all.filter(
    (r) => !f.q || [r.kind, r.name, r.namespace, r.file, ...r.ports.flatMap((p) => [p.name, p.port])].some((v) => contains(v, f.q)),
  );
  return { rows, total: all.length };
}

// Fills the commands and manifest text; the grid is filled like every other view's.
export function renderDeployment(commandsBox, manifestsBox, data) {
  commandsBox.replaceChildren(
    ...data.commands.map((cmd) =>
      el(
        "div",
        { class: "cmd" },
        el("code", { text: cmd }),
        el("button", {
          type: "button",
          text: "Copy",
          onclick: (e) => {
            navigator.clipboard?.writeText(cmd);
            e.target.textContent = "Copied";
          },
        }),
      ),
    ),
  );
  manifestsBox.replaceChildren(
    ...data.files.map((file) => el("section", {}, el("h3", { text: file.path }), el("pre", { class: "manifest", text: file.text }))),
  );
}
