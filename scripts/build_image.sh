#!/usr/bin/env bash
# Builds the Docker image from ./Dockerfile and proves it works: the image carries exactly one torch (the version
# constraints.txt pins), and `train.py experiment=smoke` runs inside it through the image's ENTRYPOINT. Prints the
# build time and the image size. Run it whenever the Dockerfile or scripts/install.sh changes.
#
# Usage: bash scripts/build_image.sh [options]
#   --engine docker|podman|buildah  the image tool [the first that works: docker or podman whose `info` succeeds
#                                   (a reachable daemon/service), else buildah, which needs none]
#   --base IMAGE|debootstrap        the base image [the Dockerfile's BASE_IMAGE, python:3.11-slim-bookworm];
#                                   `debootstrap` makes a minimal Debian of the same release (python3, python3-venv,
#                                   ca-certificates) from Debian's mirror and builds on it: for machines that reach
#                                   package mirrors but no image registry; kept (and reused) as
#                                   localhost/attent-base:bookworm-debootstrap.
#   --rebuild-base                  make the debootstrap base again even if it exists
#   --mirror URL                    Debian mirror for --base debootstrap [http://deb.debian.org/debian]
#   --tag NAME                      the image's name [attent_vision:latest]
#   --ca-bundle FILE                CA certificates pip trusts while installing (behind a TLS-intercepting proxy),
#                                   passed as the build secret `pip_ca`, never stored in the image [$PIP_CERT]
#   --build-arg KEY=VALUE           passed to the build (UID, GID, INSTALL_EXTRAS); repeatable
#   --storage-driver DRIVER         buildah only [vfs: works anywhere, but copies every layer in full]
#   --isolation MODE                buildah only [chroot: works as root inside a container or sandbox]
#   --no-smoke                      build only: skip the torch check and the smoke run
#
# buildah and debootstrap come from Debian: `bash scripts/install_system_packages.sh buildah`.
# The build downloads the CUDA wheels torch pulls in (about 3 GB) every time with buildah (no layer cache); vfs
# needs room for about three copies of the image (its size is printed at the end).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUITE=bookworm # the Debian release of the Dockerfile's default base (python:3.11-slim-bookworm)
BASE_TAG="localhost/attent-base:${SUITE}-debootstrap"
SMOKE_OVERRIDES=(experiment=smoke paths.data_dir=/tmp/attent-smoke/data paths.log_dir=/tmp/attent-smoke/outputs)

log() { printf '[build-image] %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

engine="" base="" rebuild_base=0 mirror="http://deb.debian.org/debian" tag="attent_vision:latest"
ca_bundle="${PIP_CERT:-}" storage_driver=vfs isolation=chroot smoke=1
build_args=()
while (($#)); do
  case "$1" in
    --engine | --base | --mirror | --tag | --ca-bundle | --build-arg | --storage-driver | --isolation)
      (($# >= 2)) || die "$1 needs a value (see --help)"
      case "$1" in
        --engine) engine="$2" ;;
        --base) base="$2" ;;
        --mirror) mirror="$2" ;;
        --tag) tag="$2" ;;
        --ca-bundle) ca_bundle="$2" ;;
        --build-arg) build_args+=(--build-arg "$2") ;;
        --storage-driver) storage_driver="$2" ;;
        --isolation) isolation="$2" ;;
      esac
      shift 2
      ;;
    --rebuild-base) rebuild_base=1 && shift ;;
    --no-smoke) smoke=0 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -z "${engine}" || "${engine}" =~ ^(docker|podman|buildah)$ ]] || die "--engine: expected docker, podman or buildah, got '${engine}'"
[[ -z "${ca_bundle}" || -s "${ca_bundle}" ]] || die "CA bundle '${ca_bundle}' (--ca-bundle or PIP_CERT) is not a readable file"

buildah_cmd=(buildah --storage-driver "${storage_driver}")
engine_works() {
  case "$1" in
    docker | podman) command -v "$1" >/dev/null 2>&1 && timeout 30 "$1" info >/dev/null 2>&1 ;;
    buildah) command -v buildah >/dev/null 2>&1 && "${buildah_cmd[@]}" info >/dev/null 2>&1 ;;
  esac
}
if [[ -n "${engine}" ]]; then
  engine_works "${engine}" || die "--engine ${engine}: '${engine} info' fails (not installed, or no daemon/service it can reach)"
else
  for candidate in docker podman buildah; do
    if engine_works "${candidate}"; then
      engine="${candidate}"
      break
    elif command -v "${candidate}" >/dev/null 2>&1; then
      log "${candidate} is installed but '${candidate} info' fails (no daemon?): not using it"
    fi
  done
  [[ -n "${engine}" ]] || die "no working image engine (docker, podman or buildah); install buildah with: bash scripts/install_system_packages.sh buildah"
fi

# The engine's commands, one shape for all three.
if [[ "${engine}" == buildah ]]; then
  eng=("${buildah_cmd[@]}")
  engine_desc="$(buildah --version) (${storage_driver} storage, ${isolation} isolation)"
else
  eng=("${engine}")
  engine_desc="$("${engine}" --version)"
fi
image_id() {
  case "${engine}" in
    buildah) "${eng[@]}" inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null ;;
    *) "${eng[@]}" image inspect --format '{{.Id}}' "$1" 2>/dev/null ;;
  esac
}
image_exists() {
  case "${engine}" in
    buildah) "${eng[@]}" inspect --type image "$1" >/dev/null 2>&1 ;;
    *) "${eng[@]}" image inspect "$1" >/dev/null 2>&1 ;;
  esac
}

containers=() tmpdirs=()
cleanup() {
  local c d m
  for c in "${containers[@]}"; do "${eng[@]}" rm "${c}" >/dev/null 2>&1 || true; done
  for d in "${tmpdirs[@]}"; do
    # debootstrap mounts /proc and /sys in the target; never delete through a mount.
    for m in proc sys dev/pts; do if mountpoint -q "${d}/rootfs/${m}"; then umount "${d}/rootfs/${m}" || true; fi; done
    rm -rf --one-file-system "${d}"
  done
}
trap cleanup EXIT

# The debootstrap base: a minimal Debian with python3 and its venv module, PATH set like a Docker base image.
make_debootstrap_base() {
  [[ "$(id -u)" == 0 ]] || die "--base debootstrap needs root (debootstrap builds a root filesystem)"
  command -v debootstrap >/dev/null 2>&1 || [[ -x /usr/sbin/debootstrap ]] ||
    die "--base debootstrap: debootstrap is not installed (bash scripts/install_system_packages.sh buildah)"
  local dir start=${SECONDS}
  dir="$(mktemp -d "${TMPDIR:-/var/tmp}/attent-base.XXXXXX")"
  tmpdirs+=("${dir}")
  log "debootstrap ${SUITE} from ${mirror} (python3, python3-venv, ca-certificates; a minute or two)..."
  PATH="${PATH}:/usr/sbin:/sbin" debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "${SUITE}" "${dir}/rootfs" "${mirror}" >"${dir}/debootstrap.log" 2>&1 ||
    {
      tail -n 20 "${dir}/debootstrap.log" >&2
      die "debootstrap ${SUITE} from ${mirror} failed"
    }
  rm -rf "${dir}/rootfs/var/cache/apt/archives/"*.deb "${dir}/rootfs/var/lib/apt/lists/"*
  local path_env="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  if [[ "${engine}" == buildah ]]; then
    local ctr mnt
    ctr="$("${eng[@]}" from scratch)"
    containers+=("${ctr}")
    mnt="$("${eng[@]}" mount "${ctr}")"
    tar -C "${dir}/rootfs" -cf - . | tar -C "${mnt}" -xpf -
    "${eng[@]}" umount "${ctr}" >/dev/null
    "${eng[@]}" config --env "${path_env}" --env LANG=C.UTF-8 --cmd /bin/bash "${ctr}"
    "${eng[@]}" commit --quiet "${ctr}" "${BASE_TAG}" >/dev/null
  else
    tar -C "${dir}/rootfs" -cf - . |
      "${eng[@]}" import --change "ENV ${path_env}" --change "ENV LANG=C.UTF-8" --change 'CMD ["/bin/bash"]' - "${BASE_TAG}" >/dev/null
  fi
  base_note=" (made with debootstrap in $((SECONDS - start)) s)"
  log "debootstrap base ${BASE_TAG} made in $((SECONDS - start)) s"
}

base_args=() base_note=""
case "${base}" in
  "")
    base_image="$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)"
    [[ -n "${base_image}" ]] || die "Dockerfile: no 'ARG BASE_IMAGE=...' default"
    ;;
  debootstrap)
    base_image="${BASE_TAG}"
    if ((rebuild_base)) || ! image_exists "${base_image}"; then
      make_debootstrap_base
    else
      base_note=" (debootstrap, reused; --rebuild-base makes it again)"
      log "reusing ${base_image} (--rebuild-base makes it again)"
    fi
    base_args=(--build-arg "BASE_IMAGE=${base_image}")
    ;;
  *)
    base_image="${base}"
    base_args=(--build-arg "BASE_IMAGE=${base_image}")
    ;;
esac
if ! image_exists "${base_image}"; then
  log "pulling ${base_image}..."
  "${eng[@]}" pull "${base_image}" >&2 ||
    die "cannot pull ${base_image}: no image registry reachable? Use --base debootstrap (needs only Debian's mirror) or --base IMAGE"
fi

secret_args=()
if [[ -n "${ca_bundle}" ]]; then secret_args=(--secret "id=pip_ca,src=${ca_bundle}"); fi
case "${engine}" in
  docker) build=(env DOCKER_BUILDKIT=1 docker build) ;; # build secrets need BuildKit
  podman) build=(podman build --format docker) ;;       # the docker format keeps SHELL (OCI images drop it)
  buildah) build=("${eng[@]}" bud --format docker --isolation "${isolation}" --pull=false) ;; # pulled above
esac

log "building ${tag} with ${engine_desc} on ${base_image}..."
previous_id="$(image_id "${tag}" || true)"
build_start=${SECONDS}
"${build[@]}" -f Dockerfile -t "${tag}" "${base_args[@]}" "${secret_args[@]}" "${build_args[@]}" .
build_s=$((SECONDS - build_start))
log "built ${tag} in ${build_s} s"
# The image this tag named before is left untagged: remove it (several GB each; an image still used is kept).
if [[ -n "${previous_id}" && "${previous_id}" != "$(image_id "${tag}")" ]]; then
  if "${eng[@]}" rmi "${previous_id}" >/dev/null 2>&1; then previous_id="${previous_id#sha256:}" && log "removed the previous ${tag} (${previous_id:0:12})"; fi
fi

# Inside the image (as root, so no folder is unreadable): exactly one torch anywhere, the version constraints.txt pins.
pinned_torch="$(sed -n 's/^torch==//p' constraints.txt)"
check_torch=$(
  cat <<EOF
set -euo pipefail
mapfile -t found < <(find / -xdev \\( -path '*/site-packages/torch/__init__.py' -o -path '*/dist-packages/torch/__init__.py' \\) 2>/dev/null)
printf 'torch package at %s\n' "\${found[@]%/__init__.py}"
((\${#found[@]} == 1)) || { echo "expected one torch in the image, found \${#found[@]}"; exit 1; }
python -c 'import sys, torch; v = torch.__version__.split("+")[0]; print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), pinned ${pinned_torch}"); sys.exit(v != "${pinned_torch}")'
EOF
)

torch_line="not checked (--no-smoke)" smoke_line="skipped (--no-smoke)"
if ((smoke)); then
  smoke_start=${SECONDS}
  if [[ "${engine}" == buildah ]]; then
    ctr="$("${eng[@]}" from --pull=never "${tag}")"
    containers+=("${ctr}")
    read -r -a entrypoint <<<"$("${eng[@]}" inspect --type container --format '{{range .Docker.Config.Entrypoint}}{{.}} {{end}}' "${ctr}")"
    run=("${eng[@]}" run --isolation "${isolation}" "${ctr}" --)
    run_entrypoint=("${run[@]}" "${entrypoint[@]}")
    run_root_bash=("${eng[@]}" run --isolation "${isolation}" --user 0:0 "${ctr}" -- bash -c)
  else
    run_entrypoint=("${eng[@]}" run --rm "${tag}")
    run_root_bash=("${eng[@]}" run --rm --user 0:0 --entrypoint bash "${tag}" -c)
  fi
  torch_out="$("${run_root_bash[@]}" "${check_torch}")" || {
    printf '%s\n' "${torch_out}" >&2
    die "the image does not carry exactly one torch ${pinned_torch}"
  }
  printf '%s\n' "${torch_out}"
  torch_line="$(printf '%s' "${torch_out}" | paste -sd ';' | sed 's/;/; /g')"
  log "running the image's entrypoint with ${SMOKE_OVERRIDES[*]}..."
  "${run_entrypoint[@]}" "${SMOKE_OVERRIDES[@]}" || die "the smoke run inside ${tag} failed"
  smoke_line="train.py ${SMOKE_OVERRIDES[*]} passed in $((SECONDS - smoke_start)) s"
fi

case "${engine}" in
  buildah) size="$("${eng[@]}" images --format '{{.Size}}' "${tag}" | head -n 1)" ;;
  *) size="$(numfmt --to=si --suffix=B "$("${eng[@]}" image inspect --format '{{.Size}}' "${tag}")")" ;;
esac

echo "== build_image.sh summary =="
echo "engine:     ${engine_desc}"
echo "base:       ${base_image}${base_note}"
echo "build:      ${tag} in ${build_s} s"
echo "torch:      ${torch_line}"
echo "smoke:      ${smoke_line}"
echo "image size: ${size}"
echo "total:      ${SECONDS} s"
