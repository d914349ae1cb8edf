#!/usr/bin/env bash
# The project's MLflow tracking server: runs, model registry and an artifact proxy, on loopback by default.
#
#   mlflow/server.sh                      # SQLite mlflow/mlflow.db + mlflow/artifacts/, http://127.0.0.1:5000
#   MLFLOW_AUTH=1 MLFLOW_AUTH_ADMIN_PASSWORD=... mlflow/server.sh   # with MLflow's basic auth (basic_auth.ini)
#   set -a; . mlflow/postgres-s3.env; set +a; mlflow/server.sh      # Postgres + S3 (postgres-s3.env.example)
#
# Then point the pipeline at it: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (see mlflow/README.md).
# Every setting is an environment variable; relative paths are relative to the project folder. Extra arguments go
# to `mlflow server` unchanged.
set -euo pipefail

project="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$project"

host="${MLFLOW_HOST:-127.0.0.1}"  # 0.0.0.0 only behind TLS and auth: the API can delete every run and model
port="${MLFLOW_PORT:-5000}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$project/mlflow/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$project/mlflow/artifacts}"
workers="${MLFLOW_WORKERS:-2}"
mlflow_bin="${MLFLOW_BIN:-}"
if [[ -z "$mlflow_bin" ]]; then
  if [[ -x "$project/.venv/bin/mlflow" ]]; then mlflow_bin="$project/.venv/bin/mlflow"; else mlflow_bin="mlflow"; fi
fi

args=(server
  --backend-store-uri "$backend"
  --artifacts-destination "$artifacts"  # clients upload and download through the server (mlflow-artifacts:/)
  --host "$host" --port "$port" --workers "$workers")
if [[ "${MLFLOW_AUTH:-0}" == "1" ]]; then
  export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$project/mlflow/basic_auth.ini}"
  if [[ ! -f "$MLFLOW_AUTH_CONFIG_PATH" ]]; then
    echo "error: MLFLOW_AUTH=1 but the auth config $MLFLOW_AUTH_CONFIG_PATH does not exist" >&2
    exit 2
  fi
  # Flask signs CSRF tokens with this key; all workers (and servers behind one URL) must share it. Made once here
  # when unset, readable by this user only.
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    key_file="$project/mlflow/.flask-secret-key"
    if [[ ! -s "$key_file" ]]; then
      (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$key_file")
    fi
    export MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$key_file")"
  fi
  args+=(--app-name basic-auth)
fi
if [[ "$backend" == sqlite:* ]]; then
  mkdir -p "$project/mlflow"
fi
if [[ "$artifacts" != *://* ]]; then
  mkdir -p "$artifacts"
fi
echo "mlflow server: http://$host:$port  backend=${backend%%://*}://...  artifacts=$artifacts  auth=${MLFLOW_AUTH:-0}" >&2
exec "$mlflow_bin" "${args[@]}" "$@"
