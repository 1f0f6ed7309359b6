#!/usr/bin/env bash
# The release job's command lines. Tests run this same script against the tiny recipe and
# the test Hub server. Inputs come through the environment (never inlined into the script):
#   RECIPE     recipe path; {language} is replaced by LANGUAGE
#   LANGUAGE   one ISO 639 code of the matrix
#   PUSH_REPO  push target org/name ({language} replaced); empty: the recipe's push section
#   DRY_RUN    "true" prints the plan only
#   OUT_DIR    where the run summary goes (uploaded as an artifact)
set -euo pipefail
recipe="${RECIPE//\{language\}/$LANGUAGE}"
push_repo="${PUSH_REPO:-}"
push_repo="${push_repo//\{language\}/$LANGUAGE}"
out_dir="${OUT_DIR:-release-out}/$LANGUAGE"
mkdir -p "$out_dir"
# Trusted publishing when the repository configures it; HF_TOKEN otherwise.
if [ -z "${HF_OIDC_RESOURCE:-}" ]; then unset HF_OIDC_RESOURCE; fi
if [ -z "${HF_TOKEN:-}" ]; then unset HF_TOKEN; fi

args=(run "$recipe" --format json)
if [ -n "$push_repo" ]; then args+=(--push "$push_repo"); fi
if [ "${DRY_RUN:-false}" = "true" ]; then args+=(--dry-run); fi

status=0
lrmerge "${args[@]}" > "$out_dir/run-summary.json" || status=$?
lrmerge summary "$out_dir/run-summary.json" >> "${GITHUB_STEP_SUMMARY:-$out_dir/summary.md}" || true
exit "$status"
