#!/usr/bin/env bash
# Start a real PostgreSQL on 127.0.0.1:5432 for the review-store tests and print the URL that
# RMESH_TEST_POSTGRES_URL should hold. Installs Debian's server when it is missing. Root only.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
  pg_createcluster "$version" main >&2
fi
pg_ctlcluster "$version" main start >&2 || true
for _ in $(seq 1 30); do
  su postgres -c "pg_isready -q -h 127.0.0.1 -p 5432" && break
  sleep 1
done
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname = 'rmesh'\"" | grep -q 1 \
  || su postgres -c "psql -qc \"CREATE ROLE rmesh LOGIN SUPERUSER PASSWORD 'rmesh'\"" >&2
# A fresh database each run: the review-store tests start from nothing.
su postgres -c "dropdb --if-exists rmesh_test" >&2
su postgres -c "createdb -O rmesh rmesh_test" >&2
echo "postgresql://rmesh:rmesh@127.0.0.1:5432/rmesh_test"
