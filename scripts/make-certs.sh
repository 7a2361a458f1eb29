#!/usr/bin/env bash
# A private CA and the agents' certificate, with openssl only: for clusters without cert-manager
# (deploy/cert-manager/ is the other way) and for tests that need real certificates. docs/deploy.md.
set -euo pipefail

usage() {
	cat <<'EOF'
usage: scripts/make-certs.sh DIR [--san DNS:name|IP:address ...] [--days N] [--new-ca]

Writes into DIR (created if missing):
  ca.crt, ca.key    a private CA (ECDSA P-256, 10 years)
  tls.crt, tls.key  the agents' certificate, issued by that CA (ECDSA P-256, --days, default 365):
                    serverAuth and clientAuth (the agents serve it, and the multiplexer presents it
                    to the other agents), for the names
                      DNS: netstatd-headless, netstatd-headless.kube-system.svc,
                           netstatd-headless.kube-system.svc.cluster.local, netstatd,
                           netstatd.kube-system.svc, netstatd.kube-system.svc.cluster.local, localhost
                      IP:  127.0.0.1, ::1
                    plus every --san given (repeat the flag; DNS:name or IP:address).
Keys are mode 0600. Then prints, on stdout, the kubectl command that makes the Secret netstatd-tls
(type kubernetes.io/tls, with ca.crt) from these files.

Run again on the same DIR: the CA there (ca.crt and ca.key) is kept and a new tls.crt/tls.key is
issued by it, so agents that trust the CA go on trusting the new certificate. --new-ca replaces the
CA too (then every agent needs the new Secret). A DIR holding only one of ca.crt/ca.key is refused.
EOF
}

die() {
	echo "make-certs.sh: $*" >&2
	exit 2
}

DIR=""
DAYS=365
NEW_CA=0
SANS=(
	DNS:netstatd-headless
	DNS:netstatd-headless.kube-system.svc
	DNS:netstatd-headless.kube-system.svc.cluster.local
	DNS:netstatd
	DNS:netstatd.kube-system.svc
	DNS:netstatd.kube-system.svc.cluster.local
	DNS:localhost
	IP:127.0.0.1
	IP:::1
)

add_san() {
	case "$1" in
	DNS:?* | IP:?*) SANS+=("$1") ;;
	*) die "--san takes DNS:name or IP:address, not '$1'" ;;
	esac
}

while [ $# -gt 0 ]; do
	case "$1" in
	-h | --help)
		usage
		exit 0
		;;
	--san)
		[ $# -ge 2 ] || die "--san needs a value (DNS:name or IP:address)"
		add_san "$2"
		shift 2
		;;
	--san=*)
		add_san "${1#--san=}"
		shift
		;;
	--days)
		[ $# -ge 2 ] || die "--days needs a number"
		DAYS=$2
		shift 2
		;;
	--days=*)
		DAYS=${1#--days=}
		shift
		;;
	--new-ca)
		NEW_CA=1
		shift
		;;
	-*)
		usage >&2
		die "unknown option $1"
		;;
	*)
		[ -z "$DIR" ] || die "one DIR only (got '$DIR' and '$1')"
		DIR=$1
		shift
		;;
	esac
done
[ -n "$DIR" ] || {
	usage >&2
	exit 2
}
[[ "$DAYS" =~ ^[1-9][0-9]*$ ]] || die "--days takes a positive number, not '$DAYS'"
command -v openssl >/dev/null || die "openssl is not installed"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
umask 077
WORK=$(mktemp -d "$DIR/.make-certs.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

serial() { echo "0x$(openssl rand -hex 16)"; }

# The CA: kept when both files are there (unless --new-ca), made otherwise.
if [ "$NEW_CA" = 0 ] && [ -e "$DIR/ca.crt" ] && [ -e "$DIR/ca.key" ]; then
	ca_pub=$(openssl x509 -in "$DIR/ca.crt" -noout -pubkey)
	key_pub=$(openssl pkey -in "$DIR/ca.key" -pubout)
	[ "$ca_pub" = "$key_pub" ] || die "$DIR/ca.key is not the key of $DIR/ca.crt (--new-ca makes a new CA)"
	echo "make-certs.sh: issuing with the existing CA in $DIR" >&2
elif [ "$NEW_CA" = 0 ] && { [ -e "$DIR/ca.crt" ] || [ -e "$DIR/ca.key" ]; }; then
	die "$DIR has only one of ca.crt and ca.key (--new-ca makes a new CA)"
else
	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/ca.key"
	openssl req -x509 -new -key "$WORK/ca.key" -days 3650 -sha256 -set_serial "$(serial)" \
		-subj "/O=netstatd/CN=netstatd CA" \
		-addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
		-addext "keyUsage=critical,keyCertSign,cRLSign" \
		-addext "subjectKeyIdentifier=hash" \
		-out "$WORK/ca.crt"
	chmod 0600 "$WORK/ca.key"
	chmod 0644 "$WORK/ca.crt"
	mv -f "$WORK/ca.key" "$DIR/ca.key"
	mv -f "$WORK/ca.crt" "$DIR/ca.crt"
	echo "make-certs.sh: new CA in $DIR/ca.crt" >&2
fi

# The agents' certificate: server and client, every name above.
san=$(
	IFS=,
	echo "${SANS[*]}"
)
cat >"$WORK/leaf.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $san
EOF
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/tls.key"
openssl req -new -key "$WORK/tls.key" -subj "/O=netstatd/CN=netstatd" -out "$WORK/tls.csr"
openssl x509 -req -in "$WORK/tls.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" -set_serial "$(serial)" \
	-days "$DAYS" -sha256 -extfile "$WORK/leaf.ext" -out "$WORK/tls.crt" 2>/dev/null
openssl verify -CAfile "$DIR/ca.crt" -purpose sslserver "$WORK/tls.crt" >/dev/null
openssl verify -CAfile "$DIR/ca.crt" -purpose sslclient "$WORK/tls.crt" >/dev/null
chmod 0600 "$WORK/tls.key"
chmod 0644 "$WORK/tls.crt"
mv -f "$WORK/tls.key" "$DIR/tls.key"
mv -f "$WORK/tls.crt" "$DIR/tls.crt"
echo "make-certs.sh: $DIR/tls.crt for $san, valid $DAYS days" >&2

q() { printf '%q' "$1"; }
echo "kubectl -n kube-system create secret generic netstatd-tls --type=kubernetes.io/tls" \
	"--from-file=tls.crt=$(q "$DIR/tls.crt") --from-file=tls.key=$(q "$DIR/tls.key")" \
	"--from-file=ca.crt=$(q "$DIR/ca.crt")"
