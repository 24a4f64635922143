#!/usr/bin/env bash
# One-time GCP prerequisites for cluster/gcp-gpu.yaml (see cluster/README.md):
#   - VPC network + subnet `fgray-ray` whose only ingress rules are SSH from SSH_CIDR and
#     all traffic between nodes tagged `fgray-ray`. The default network is not used, so its
#     default-allow-* rules never apply. Ray's ports (6379, 8265, 10001) stay inside.
#   - the bucket for datasets and studies (uniform access, public access prevented);
#   - service account `fgray-ray-worker` with object read/write on that bucket only; workers
#     run as it, so no key file exists anywhere. (The head runs as Ray's own
#     ray-autoscaler-sa-v1, which `ray up` creates with rights to launch workers.)
#
#   PROJECT_ID=my-project BUCKET=my-fgray-bucket SSH_CIDR=203.0.113.7/32 \
#     bash cluster/gcp-prereqs.sh
#
# Safe to re-run: anything that already exists is left as it is.
set -euo pipefail

: "${PROJECT_ID:?set PROJECT_ID to your GCP project id}"
: "${BUCKET:?set BUCKET to the bucket for datasets and studies (created if missing)}"
: "${SSH_CIDR:?set SSH_CIDR to the only source allowed to SSH, e.g. your address as a /32}"
REGION="${REGION:-us-central1}"
SUBNET_RANGE="${SUBNET_RANGE:-10.42.0.0/20}"

if [[ "$SSH_CIDR" == "0.0.0.0/0" || "$SSH_CIDR" == "::/0" ]]; then
  echo "error: SSH_CIDR=$SSH_CIDR would open SSH to the world; use your address or VPN range" >&2
  exit 2
fi

NETWORK=fgray-ray
TAG=fgray-ray
WORKER_SA="fgray-ray-worker@${PROJECT_ID}.iam.gserviceaccount.com"
gc=(gcloud --project "$PROJECT_ID" --quiet)

exists() { "$@" >/dev/null 2>&1; }

exists "${gc[@]}" compute networks describe "$NETWORK" ||
  "${gc[@]}" compute networks create "$NETWORK" --subnet-mode=custom

exists "${gc[@]}" compute networks subnets describe "$NETWORK" --region "$REGION" ||
  "${gc[@]}" compute networks subnets create "$NETWORK" --network "$NETWORK" \
    --region "$REGION" --range "$SUBNET_RANGE" --enable-private-ip-google-access

# The only two ingress rules of the network (GCP denies all other ingress by default).
exists "${gc[@]}" compute firewall-rules describe fgray-ray-ssh ||
  "${gc[@]}" compute firewall-rules create fgray-ray-ssh --network "$NETWORK" \
    --direction INGRESS --allow tcp:22 --source-ranges "$SSH_CIDR" --target-tags "$TAG"

exists "${gc[@]}" compute firewall-rules describe fgray-ray-internal ||
  "${gc[@]}" compute firewall-rules create fgray-ray-internal --network "$NETWORK" \
    --direction INGRESS --allow tcp,udp,icmp --source-tags "$TAG" --target-tags "$TAG"

exists "${gc[@]}" storage buckets describe "gs://$BUCKET" ||
  "${gc[@]}" storage buckets create "gs://$BUCKET" --location "$REGION" \
    --uniform-bucket-level-access --public-access-prevention

exists "${gc[@]}" iam service-accounts describe "$WORKER_SA" ||
  "${gc[@]}" iam service-accounts create fgray-ray-worker \
    --display-name "fgray Ray workers (bucket access only)"

# A new service account takes a few seconds to become visible to IAM; retry until it is.
for attempt in 1 2 3 4 5 6; do
  "${gc[@]}" storage buckets add-iam-policy-binding "gs://$BUCKET" \
    --member "serviceAccount:$WORKER_SA" --role roles/storage.objectUser >/dev/null && break
  [[ $attempt == 6 ]] && exit 1
  sleep 10
done

echo "ready: network $NETWORK ($REGION), SSH from $SSH_CIDR, bucket gs://$BUCKET, $WORKER_SA"
