#!/usr/bin/env bash
# A local CA and one certificate per service for mutual TLS between the mesh's services (and TLS
# on the router's public port), in DIR (default build/certs). For development only: production
# certificates come from cert-manager or your own CA (see the chart's meshTLS values).
#   DIR/ca.pem                 the CA every service trusts (RMESH_MESH_TLS_CA)
#   DIR/<service>.pem, .key    router, solver, verifier (RMESH_MESH_TLS_CERT, RMESH_MESH_TLS_KEY)
# Each certificate names localhost, 127.0.0.1 and the service's in-cluster names.
set -euo pipefail
dir=${1:-build/certs}
days=${RMESH_CERT_DAYS:-30}
command -v openssl >/dev/null || { echo "dev-certs: openssl is needed (apt-get install openssl)" >&2; exit 3; }
mkdir -p "$dir"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=rmesh-dev-ca" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
for service in router solver verifier; do
  names="DNS:localhost,IP:127.0.0.1,DNS:rmesh-$service,DNS:reasoning-mesh-$service,DNS:*.svc.cluster.local"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=rmesh-$service" \
    -keyout "$dir/$service.key" -out "$dir/$service.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$names" > "$dir/$service.ext"
  openssl x509 -req -in "$dir/$service.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days "$days" -extfile "$dir/$service.ext" -out "$dir/$service.pem" 2>/dev/null
  rm -f "$dir/$service.csr" "$dir/$service.ext"
done
chmod 644 "$dir"/*.pem
echo "$dir: ca.pem and router, solver, verifier certificates (valid $days days)"
