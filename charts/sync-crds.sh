#!/usr/bin/env bash
# Copy the CRDs from crds/ into the Helm chart, which must ship identical copies;
# tests/chart/test_chart_crds.py fails when they drift. `python -m rlhf_operator.crdgen` regenerates
# both from the operator's schema in one go; this script only copies (no Python needed).
# Usage: charts/sync-crds.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/crds"
dest="$root/charts/rlhf-operator/crds"
shopt -s nullglob
files=("$src"/*.yaml)
if [ ${#files[@]} -eq 0 ]; then
  echo "sync-crds: no CRD files in $src; generate them first (see operator/)" >&2
  exit 1
fi
mkdir -p "$dest"
rm -f "$dest"/*.yaml
cp "${files[@]}" "$dest"/
echo "sync-crds: copied ${#files[@]} CRD file(s) to $dest"
