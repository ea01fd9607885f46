#!/usr/bin/env bash
# The platform's main job, end to end, as a user runs it:
#   start the platform, create a tenant and its access key, log in as that
#   tenant, train the seed's linear-regression demo as a train job, deploy the
#   exported SavedModel, and call Predict: over REST with the CLI and over
#   gRPC with the stock TensorFlow Serving client.
# Idempotent: re-running reuses the data dir (state survives) and the tenant.
#   CLOUDML_DEMO_DIR   data dir (default: ./.demo)
#   CLOUDML_GRPC_PORT  gateway gRPC port (default 8500), CLOUDML_REST_PORT (8501)
#   CLOUDML_DEMO_KEEP=1 leaves the platform running at the end
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

DATA="${CLOUDML_DEMO_DIR:-$PWD/.demo}"
GRPC_PORT="${CLOUDML_GRPC_PORT:-8500}"
REST_PORT="${CLOUDML_REST_PORT:-8501}"
export PATH="$PWD/.venv/bin:$PATH"
export CLOUDML_CONFIG="$DATA/cli-config.json"
unset CLOUDML_ENDPOINT CLOUDML_ACCESS_KEY CLOUDML_SECRET_KEY CLOUDML_PROFILE

step() { printf '\n==> %s\n' "$*"; }
cleanup() {
  if [ "${CLOUDML_DEMO_KEEP:-0}" != 1 ]; then
    step "cloudml-platform down"
    cloudml-platform down --data-dir "$DATA" || true
  fi
}
trap cleanup EXIT

step "cloudml-platform up --data-dir $DATA --grpc-port $GRPC_PORT --rest-port $REST_PORT --detach"
if ! cloudml-platform up --data-dir "$DATA" --grpc-port "$GRPC_PORT" --rest-port "$REST_PORT" --detach; then
  echo "hint: this script takes its ports from CLOUDML_GRPC_PORT (now $GRPC_PORT) and CLOUDML_REST_PORT" \
       "(now $REST_PORT), e.g. CLOUDML_GRPC_PORT=9500 CLOUDML_REST_PORT=9501 scripts/demo.sh" >&2
  exit 1
fi
cloudml-platform status --data-dir "$DATA"

step "cloudml configure --from-file $DATA/credentials.json   (the admin's credentials)"
cloudml configure --from-file "$DATA/credentials.json"
cloudml auth whoami

step "cloudml tenants create demo"
if ! cloudml tenants describe demo >/dev/null 2>&1; then
  cloudml tenants create demo --description "the demo team"
fi
cloudml tenants list

step "cloudml quota set --tenant demo --cpu 2 --memory 4Gi --train-jobs 4"
cloudml quota set --tenant demo --cpu 2 --memory 4Gi --train-jobs 4

step "cloudml keys create --tenant demo   (a key for the demo team)"
key_json="$(cloudml keys create --tenant demo --description "demo script" -o json)"
access_key="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["access_key"]["access_key_id"])' <<<"$key_json")"
secret_key="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["secret_key"])' <<<"$key_json")"
echo "access key: $access_key"

step "cloudml configure --profile demo --access-key $access_key --secret-key ...   (act as the demo tenant)"
cloudml configure --profile demo --access-key "$access_key" --secret-key "$secret_key"
export CLOUDML_PROFILE=demo     # the same as --profile demo on every command below
cloudml auth whoami
token="$(cloudml auth print-access-token)"
echo "bearer token: ${token:0:24}...(${#token} chars)"

step "cloudml quota get   (as the demo tenant)"
cloudml quota get

step "a member cannot manage tenants (expected: PERMISSION_DENIED)"
if cloudml tenants create not-allowed 2>&1; then
  echo "unexpected: a member created a tenant" >&2; exit 1
fi

step "build the trainer package (examples/trainers/linear -> trainer-1.0.tar.gz)"
package="$(.venv/bin/python examples/build_packages.py "$DATA/packages" --only linear --json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["linear"])')"
echo "$package"

step "cloudml jobs submit -n linear -m trainer.task -u trainer-1.0.tar.gz -a '--max_epochs 10' -c 0.5 -M 1Gi --watch"
cloudml jobs submit -n linear -m trainer.task -u "$package" -a "--max_epochs 10" -c 0.5 -M 1Gi --watch
state="$(cloudml jobs describe linear -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')"
if [ "$state" != "JOB_STATE_SUCCEEDED" ]; then
  echo "the train job ended $state" >&2; cloudml jobs describe linear >&2; exit 1
fi
cloudml jobs metrics linear
output_path="$(cloudml jobs describe linear -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["spec"]["output_path"])')"

step "cloudml models create -n linear -v v1 -u $output_path/model/1 --wait"
cloudml models create -n linear -v v1 -u "$output_path/model/1" --wait
cloudml models describe linear

step "cloudml models predict linear v1 -d data.json   (REST, the seed's data format)"
cat > "$DATA/data.json" <<'JSON'
{"keys_dtype": "int32", "keys": [[1], [2]], "X_dtype": "float32", "X": [[10.0], [30.0]]}
JSON
cat "$DATA/data.json"
cloudml models predict linear 1 -d "$DATA/data.json" -o json

step "Predict with the stock TF Serving gRPC client (examples/predict_client.py)"
.venv/bin/python examples/predict_client.py --endpoint "127.0.0.1:$GRPC_PORT" --model linear \
  --token "$(cloudml auth print-access-token)" --input keys:int32:1,2 --input X:float32:10,30
echo
echo "demo finished: platform data in $DATA"
