// Validates Kubernetes objects (multi-document YAML files given as arguments) against the
// Kubernetes OpenAPI schemas, with the kubernetes-models classes (JSON Schema, ajv), the
// Prometheus Operator's CRD schemas for ServiceMonitor. Prints one line per object; exits 1 if
// any object is invalid or of a kind without a schema.
//   node validate.js [--dump-configmaps DIR] FILE...
// --dump-configmaps writes each ConfigMap's data to DIR/<file name>/<ConfigMap name>/<key>, for
// the checks that parse what the pods will read.
"use strict";
const fs = require("fs");
const YAML = require("yaml");

function modelClass(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  const pkg = group === "monitoring.coreos.com" ? "@kubernetes-models/prometheus-operator" : "kubernetes-models";
  const path = group ? `${pkg}/${group}/${version}/${kind}` : `${pkg}/${version}/${kind}`;
  try {
    return require(path)[kind];
  } catch (e) {
    return null;
  }
}

const path = require("path");
let args = process.argv.slice(2);
let dumpDir = null;
if (args[0] === "--dump-configmaps") {
  dumpDir = args[1];
  args = args.slice(2);
}

let failed = false;
for (const file of args) {
  for (const doc of YAML.parseAllDocuments(fs.readFileSync(file, "utf8"))) {
    if (doc.errors.length) {
      console.log(`${file}: YAML error: ${doc.errors[0].message}`);
      failed = true;
      continue;
    }
    const obj = doc.toJSON();
    if (obj === null) continue;
    const name = `${file}: ${obj.apiVersion}/${obj.kind} ${obj.metadata && obj.metadata.name}`;
    const Model = modelClass(String(obj.apiVersion), String(obj.kind));
    if (!Model) {
      console.log(`${name}: no schema for this kind`);
      failed = true;
      continue;
    }
    try {
      new Model(obj).validate();
      console.log(`${name}: valid`);
      if (dumpDir && obj.kind === "ConfigMap") {
        const dir = path.join(dumpDir, path.basename(file), obj.metadata.name);
        fs.mkdirSync(dir, { recursive: true });
        for (const [key, value] of Object.entries(obj.data || {})) fs.writeFileSync(path.join(dir, key), value);
      }
    } catch (e) {
      console.log(`${name}: INVALID: ${e.message}`);
      failed = true;
    }
  }
}
process.exit(failed ? 1 : 0);
