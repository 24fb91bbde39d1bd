#!/usr/bin/env bash
# install.sh: install, upgrade or remove the Stem appliance on a Debian host with systemd,
# from the checkout this script lives in. Safe to run again: a second run changes nothing
# and says so. Run with --help for the options; docs/deploy.md for the whole story.
#
# What it lays down (each below DIR with --prefix DIR):
#   /opt/stem/venv                   the venv, with this checkout pip-installed
#   /etc/stem/stem.toml              config/stem.toml, the database in /var/lib/stem (an
#                                    edited copy is never overwritten: stem.toml.dist then)
#   /etc/stem/stem.env               STEM_APP and other STEM_* variables (written once)
#   /var/lib/stem                    the state directory, 0700, owned by stem
#   /etc/systemd/system/stem*        stem.service, stem@.service, stem-beat.service, stem.target
# and the system user stem; then `systemctl enable --now stem.target stem.service`.
#
# Everything is in functions and `main "$@"` is the last line, so a truncated download
# runs nothing.
set -Eeuo pipefail

readonly OPT_DIR=/opt/stem
readonly VENV_DIR=/opt/stem/venv
readonly CONFIG_DIR=/etc/stem
readonly STATE_DIR=/var/lib/stem
readonly UNIT_DIR=/etc/systemd/system
readonly UNITS=(stem.target stem.service stem@.service stem-beat.service)
readonly SERVICE_USER=stem
# The record of the stem.toml this script last installed: a file that still matches it
# was not edited, so it may take new defaults.
readonly CONFIG_RECORD=/opt/stem/stem.toml.sha256
# Written inside the venv: what it was built from (Python and the checkout's files).
readonly VENV_STAMP=/opt/stem/venv/.stem-install
# The line of config/stem.toml that install.sh points at the state directory.
readonly DEFAULT_DB_LINE='broker_url = "sqlite:///./var/stem.db"'

ROOT=""         # --prefix: the tree is written below it; empty: this system
DRY_RUN=0       # --dry-run: print every step, change nothing
UNINSTALL=0
PURGE=0
NO_START=0
WHEELHOUSE="${STEM_INSTALL_WHEELHOUSE:-}"  # --offline: pip install from this directory only
PYTHON="${STEM_INSTALL_PYTHON:-}"          # --python: the interpreter of the venv
SRC=""          # the checkout
TMP=""          # scratch space, removed on exit
CHANGED=()      # what this run changed (or, with --dry-run, would change)

usage() {
    cat <<'EOF'
Usage: install.sh [OPTIONS]

Install the Stem appliance from this checkout: the system user stem, a venv in
/opt/stem/venv, /etc/stem/stem.toml, /var/lib/stem and the systemd units, then
`systemctl enable --now stem.target stem.service`. Run it again to upgrade in place.

Options:
  --prefix DIR      lay the whole tree below DIR (DIR/opt/stem/venv, DIR/etc/stem, ...);
                    no user is created and no systemctl is run (each is printed)
  --dry-run         print every step and change nothing
  --no-start        install, but do not enable or start any unit
  --offline DIR     pip installs from the wheels in DIR only (pip install --no-index
                    --find-links DIR); build one with `pip wheel -w DIR . setuptools wheel`
  --python PATH     the Python of the venv (default: /usr/bin/python3)
  --uninstall       stop and disable the units, remove them and the venv; keep
                    /etc/stem and /var/lib/stem
  --purge           with --uninstall: remove /etc/stem and /var/lib/stem too
  -h, --help        show this help

Environment: STEM_INSTALL_PYTHON (as --python), STEM_INSTALL_WHEELHOUSE (as --offline),
STEM_INSTALL_PIP_ARGS (extra arguments for pip install, split on spaces).
EOF
}

# --- output and actions ---------------------------------------------------------------

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

# A command line as the shell would read it back.
quoted() {
    local out
    printf -v out '%q ' "$@"
    printf '%s' "${out% }"
}

# Run a step that writes inside the tree (or print it under --dry-run).
act() {
    if ((DRY_RUN)); then
        note "[dry-run] $(quoted "$@")"
    else
        "$@" || die "this step failed: $(quoted "$@")"
    fi
}

# Run a step that changes the system outside the tree: users, owners, packages,
# systemctl. Printed instead under --dry-run and --prefix. With --may-fail first, a
# failure is reported and the run goes on.
system() {
    local may_fail=0
    if [[ $1 == --may-fail ]]; then
        may_fail=1
        shift
    fi
    if ((DRY_RUN)); then
        note "[dry-run] $(quoted "$@")"
    elif [[ -n $ROOT ]]; then
        note "[--prefix] not run: $(quoted "$@")"
    elif ! "$@"; then
        ((may_fail)) || die "this step failed: $(quoted "$@")"
        note "(failed, going on: $(quoted "$@"))"
    fi
}

# systemctl, when systemd runs this host (PID 1); printed otherwise.
systemctl_do() {
    local may_fail=()
    if [[ $1 == --may-fail ]]; then
        may_fail=(--may-fail)
        shift
    fi
    if [[ -z $ROOT ]] && ((!DRY_RUN)) && [[ ! -d /run/systemd/system ]]; then
        note "[no systemd running] not run: $(quoted systemctl "$@")"
        return 0
    fi
    system "${may_fail[@]}" systemctl "$@"
}

changed() {
    CHANGED+=("$1")
    if ((DRY_RUN)); then
        note "would change: $1"
    else
        note "changed: $1"
    fi
}

cleanup() {
    if [[ -n $TMP ]]; then
        rm -rf "$TMP"
    fi
}

on_error() {
    printf 'install.sh: error: a step failed (line %s); nothing after it ran\n' "$1" >&2
}

# --- arguments and checks -------------------------------------------------------------

parse_args() {
    while (($#)); do
        case $1 in
            --prefix)
                (($# >= 2)) || die "--prefix needs a directory"
                ROOT=$(realpath -m -- "$2")
                shift
                ;;
            --prefix=*) ROOT=$(realpath -m -- "${1#*=}") ;;
            --offline)
                (($# >= 2)) || die "--offline needs a wheel directory"
                WHEELHOUSE=$2
                shift
                ;;
            --offline=*) WHEELHOUSE=${1#*=} ;;
            --python)
                (($# >= 2)) || die "--python needs a path"
                PYTHON=$2
                shift
                ;;
            --python=*) PYTHON=${1#*=} ;;
            --dry-run) DRY_RUN=1 ;;
            --no-start) NO_START=1 ;;
            --uninstall) UNINSTALL=1 ;;
            --purge) PURGE=1 ;;
            -h | --help)
                usage
                exit 0
                ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
        shift
    done
    if [[ $ROOT == / ]]; then
        ROOT=""
    fi
    if ((PURGE && !UNINSTALL)); then
        die "--purge only goes with --uninstall (it removes the config and the data)"
    fi
}

preflight() {
    SRC=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
    if [[ -z $ROOT ]] && ((!DRY_RUN)) && [[ $(id -u) != 0 ]]; then
        die "run as root to install on this system (or try --dry-run, or --prefix DIR)"
    fi
    if ((UNINSTALL)); then
        return 0
    fi
    local item
    for item in pyproject.toml config/stem.toml systemd/stem.service; do
        [[ -f $SRC/$item ]] || die "$SRC is not a Stem checkout (no $item)"
    done
    if [[ -z $PYTHON ]]; then
        PYTHON=/usr/bin/python3
        [[ -x $PYTHON ]] || PYTHON=$(command -v python3) || die "python3 not found"
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "Python >= 3.11 is required ($PYTHON is $("$PYTHON" --version 2>&1))"
    if [[ -n $WHEELHOUSE ]]; then
        [[ -d $WHEELHOUSE ]] || die "--offline: no such directory: $WHEELHOUSE"
        WHEELHOUSE=$(realpath -- "$WHEELHOUSE")
    fi
    TMP=$(mktemp -d)
}

# python3 -m venv needs ensurepip, which Debian ships apart, in python3-venv.
ensure_venv_module() {
    if "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        return 0
    fi
    local package=python3-venv
    if [[ $(realpath -- "$PYTHON") != "$(realpath -- /usr/bin/python3 2>/dev/null || true)" ]]; then
        package=$("$PYTHON" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')
    fi
    say "Debian package $package (python -m venv needs it)"
    if ((DRY_RUN)); then
        note "[dry-run] apt-get install -y $package"
    elif [[ -z $ROOT && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        system apt-get update -qq
        system env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package"
        changed "installed the Debian package $package"
    else
        die "$PYTHON cannot create a venv: run 'sudo apt-get install -y $package' first"
    fi
}

# --- the parts of an install ----------------------------------------------------------

ensure_user() {
    say "System user $SERVICE_USER"
    local cmd=(useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home
        --shell /usr/sbin/nologin --comment "Stem appliance" "$SERVICE_USER")
    if [[ -n $ROOT ]]; then
        system "${cmd[@]}"
    elif getent passwd "$SERVICE_USER" >/dev/null; then
        note "exists"
    else
        system "${cmd[@]}"
        changed "created the system user $SERVICE_USER"
    fi
}

# ensure_dir PATH MODE [OWNER:GROUP]: create it, or fix its mode and owner.
ensure_dir() {
    local path=$ROOT$1 mode=$2 owner=${3:-}
    if [[ ! -d $path ]]; then
        act mkdir -p -m "$mode" "$path" # -m sets the mode itself, whatever the umask
        changed "$path (created, mode $mode)"
    elif [[ $(stat -c %a "$path") != "$mode" ]]; then
        act chmod "$mode" "$path"
        changed "$path (mode $mode)"
    fi
    if [[ -n $owner ]]; then
        ensure_owner "$path" "$owner"
    fi
}

ensure_owner() {
    local path=$1 owner=$2
    if [[ -n $ROOT ]]; then
        system chown "$owner" "$path"
    elif [[ ! -e $path ]] || [[ $(stat -c %U:%G "$path") != "$owner" ]]; then
        system chown "$owner" "$path"
        changed "$path (owner $owner)"
    fi
}

# install_file SRC DEST MODE [OWNER:GROUP]: copy when the content or the mode differs.
# Returns 0 when it changed DEST.
install_file() {
    local src=$1 dest=$2 mode=$3 owner=${4:-} result=1
    if [[ ! -f $dest ]] || ! cmp -s -- "$src" "$dest"; then
        act install -m "$mode" -- "$src" "$dest"
        changed "$dest"
        result=0
    elif [[ $(stat -c %a "$dest") != "$mode" ]]; then
        act chmod "$mode" "$dest"
        changed "$dest (mode $mode)"
        result=0
    fi
    if [[ -n $owner ]]; then
        ensure_owner "$dest" "$owner"
    fi
    return "$result"
}

install_dirs() {
    say "Directories"
    ensure_dir "$OPT_DIR" 755
    ensure_dir "$CONFIG_DIR" 750 "root:$SERVICE_USER"
    ensure_dir "$STATE_DIR" 700 "$SERVICE_USER:$SERVICE_USER"
    ensure_dir "$UNIT_DIR" 755
}

UNITS_CHANGED=0
UPGRADE=0 # stem.service was installed before this run
install_units() {
    say "systemd units in $ROOT$UNIT_DIR"
    local unit
    if [[ -f $ROOT$UNIT_DIR/stem.service ]]; then
        UPGRADE=1
    fi
    for unit in "${UNITS[@]}"; do
        if install_file "$SRC/systemd/$unit" "$ROOT$UNIT_DIR/$unit" 644; then
            UNITS_CHANGED=1
        fi
    done
}

# config/stem.toml with the database in the state directory.
render_config() {
    grep -qxF -- "$DEFAULT_DB_LINE" "$SRC/config/stem.toml" ||
        die "config/stem.toml has no line '$DEFAULT_DB_LINE' to point at $STATE_DIR"
    local comment="# install.sh: the database lives in the service's state directory."
    local line="broker_url = \"sqlite:///$STATE_DIR/stem.db\""
    awk -v old="$DEFAULT_DB_LINE" -v comment="$comment" -v line="$line" \
        '$0 == old { print comment; print line; next } { print }' \
        "$SRC/config/stem.toml" >"$TMP/stem.toml"
}

render_env() {
    cat >"$TMP/stem.env" <<'EOF'
# /etc/stem/stem.env: the environment of stem.service, stem@*.service and
# stem-beat.service (stem@NAME also reads /etc/stem/NAME.env, which wins).
# install.sh writes this file once and never changes it. After an edit:
#   systemctl restart stem.target
#
# The app whose tasks the workers run, as MODULE:ATTR. It must be importable by
# /opt/stem/venv/bin/python: install it into the venv (/opt/stem/venv/bin/pip install
# /srv/myapp) or name its directory in PYTHONPATH. The demo app ships with stem.
STEM_APP=appliance.demo:stem
#PYTHONPATH=/srv/myapp
#
# Any setting of /etc/stem/stem.toml as a STEM_* variable (these win over the file):
#STEM_LOG_FORMAT=json
#STEM_CONCURRENCY=4
EOF
}

CONFIG_CHANGED=0
install_config() {
    say "Configuration in $ROOT$CONFIG_DIR"
    render_config
    render_env
    local dest=$ROOT$CONFIG_DIR/stem.toml record=$ROOT$CONFIG_RECORD new current
    new=$(sha256sum <"$TMP/stem.toml" | cut -d' ' -f1)
    if [[ ! -f $dest ]]; then
        install_file "$TMP/stem.toml" "$dest" 640 "root:$SERVICE_USER" || true
        CONFIG_CHANGED=1
        record_config "$new"
    else
        current=$(sha256sum <"$dest" | cut -d' ' -f1)
        if [[ $current == "$new" ]]; then
            note "stem.toml is up to date"
            record_config "$new"
        elif [[ -f $record && $(<"$record") == "$current" ]]; then
            note "stem.toml was not edited since the last install: new defaults"
            install_file "$TMP/stem.toml" "$dest" 640 "root:$SERVICE_USER" || true
            CONFIG_CHANGED=1
            record_config "$new"
        else
            # The record is left alone: it only ever names a file this script wrote.
            note "stem.toml was edited: kept; the new defaults are in stem.toml.dist"
            install_file "$TMP/stem.toml" "$dest.dist" 640 "root:$SERVICE_USER" || true
        fi
    fi
    if [[ -f $ROOT$CONFIG_DIR/stem.env ]]; then
        note "stem.env exists: kept"
    else
        install_file "$TMP/stem.env" "$ROOT$CONFIG_DIR/stem.env" 640 "root:$SERVICE_USER" || true
    fi
}

# record_config HASH: remember the stem.toml this script installed.
record_config() {
    local record=$ROOT$CONFIG_RECORD
    if [[ -f $record && $(<"$record") == "$1" ]]; then
        return 0
    fi
    if ((DRY_RUN)); then
        note "[dry-run] write $1 to $record"
    else
        printf '%s\n' "$1" >"$record"
    fi
    changed "$record"
}

# The files pip builds from: the checkout without caches and build leftovers, copied so
# that building never writes into the checkout.
stage_source() {
    local item items=()
    for item in pyproject.toml README.md LICENSE appliance tui; do
        if [[ -e $SRC/$item ]]; then
            items+=("$item")
        fi
    done
    mkdir -p "$TMP/src"
    tar -C "$SRC" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
        -cf - "${items[@]}" | tar -C "$TMP/src" -xf -
}

# What the venv is built from: the interpreter (its path and minor version: a venv
# survives a patch release) and every source file.
venv_fingerprint() {
    local sources
    sources=$(cd "$TMP/src" && find . -type f -print0 | LC_ALL=C sort -z |
        xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
    printf 'python=%s %s\nsource=%s\n' "$(realpath -- "$PYTHON")" \
        "$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" "$sources"
}

VENV_CHANGED=0
install_venv() {
    say "venv in $ROOT$VENV_DIR"
    stage_source
    local venv=$ROOT$VENV_DIR stamp=$ROOT$VENV_STAMP want have="" pip_args=()
    want=$(venv_fingerprint)
    if [[ -f $stamp ]]; then
        have=$(<"$stamp")
    fi
    if [[ $have == "$want" && -x $venv/bin/python && -x $venv/bin/stem ]]; then
        note "up to date (same Python, same checkout)"
        return 0
    fi
    if [[ ! -x $venv/bin/python ]]; then
        act "$PYTHON" -m venv "$venv"
    elif [[ ${have%%$'\n'*} != "${want%%$'\n'*}" ]]; then
        # Another Python: a venv cannot change its interpreter in place.
        note "another Python ($(sed -n 's/^python=//p' <<<"$want")): the venv is rebuilt;"
        note "reinstall anything you added to it (your app) afterwards"
        act "$PYTHON" -m venv --clear "$venv"
    fi
    if [[ -n $WHEELHOUSE ]]; then
        pip_args+=(--no-index --find-links "$WHEELHOUSE")
    fi
    if [[ -n ${STEM_INSTALL_PIP_ARGS:-} ]]; then
        local extra
        read -r -a extra <<<"$STEM_INSTALL_PIP_ARGS"
        pip_args+=("${extra[@]}")
    fi
    # In place: pip replaces the project and upgrades what it needs, keeping anything
    # else installed in the venv (an operator's app).
    act "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade \
        "${pip_args[@]}" "$TMP/src"
    if ((!DRY_RUN)); then
        printf '%s\n' "$want" >"$stamp"
    fi
    changed "$venv ($(sed -n 's/^python=//p' <<<"$want"))"
    VENV_CHANGED=1
}

start_units() {
    say "systemd"
    if ((UNITS_CHANGED)); then
        systemctl_do daemon-reload
    fi
    if ((NO_START)); then
        note "--no-start: no unit enabled or started. Later:"
        note "  systemctl enable --now stem.target stem.service"
        return 0
    fi
    if ((UPGRADE && (UNITS_CHANGED || VENV_CHANGED || CONFIG_CHANGED))); then
        # Running units pick up the new code, units and config; stopped ones stay stopped.
        systemctl_do try-restart stem.service 'stem@*.service' stem-beat.service
    fi
    # stem-beat.service is installed but never enabled here (see the unit).
    systemctl_do enable --now stem.target stem.service
}

do_install() {
    ensure_venv_module
    ensure_user
    install_dirs
    install_units
    install_config
    install_venv
    start_units
    if ((${#CHANGED[@]} == 0)); then
        say "Nothing changed: the install in ${ROOT:-/} is up to date"
    elif ((DRY_RUN)); then
        say "Dry run: ${#CHANGED[@]} change(s) would be made; nothing was changed"
    else
        say "Installed in ${ROOT:-/}: ${#CHANGED[@]} change(s)"
    fi
}

# --- uninstall ------------------------------------------------------------------------

remove() {
    local path=$1
    if [[ -e $path || -L $path ]]; then
        act rm -rf -- "$path"
        changed "$path (removed)"
    fi
}

do_uninstall() {
    say "systemd"
    local units_present=0 unit
    for unit in "${UNITS[@]}"; do
        if [[ -e $ROOT$UNIT_DIR/$unit ]]; then
            units_present=1
        fi
    done
    if ((units_present)); then
        # Best effort: a unit that cannot be stopped (never loaded) must not keep its
        # files on disk.
        systemctl_do --may-fail stop stem.target stem.service 'stem@*.service' stem-beat.service
        # Disabling the template removes every instance's link too.
        systemctl_do --may-fail disable stem.target stem.service stem@.service stem-beat.service
    fi
    say "Units and venv"
    for unit in "${UNITS[@]}"; do
        remove "$ROOT$UNIT_DIR/$unit"
    done
    if ((units_present)); then
        systemctl_do daemon-reload
    fi
    remove "$ROOT$VENV_DIR"
    remove "$ROOT$CONFIG_RECORD"
    if [[ -d $ROOT$OPT_DIR ]] && [[ -z $(ls -A -- "$ROOT$OPT_DIR") ]]; then
        act rmdir -- "$ROOT$OPT_DIR"
        changed "$ROOT$OPT_DIR (removed)"
    fi
    if ((PURGE)); then
        say "Configuration and data (--purge)"
        remove "$ROOT$CONFIG_DIR"
        # The whole directory at once, after the units stopped: a database and its -wal
        # and -shm go together or not at all (deleting a -wal alone loses commits).
        remove "$ROOT$STATE_DIR"
    else
        note "kept: $ROOT$CONFIG_DIR and $ROOT$STATE_DIR (remove them with --uninstall --purge)"
    fi
    note "kept: the system user $SERVICE_USER (files may still be owned by it; userdel $SERVICE_USER)"
    if ((${#CHANGED[@]} == 0)); then
        say "Nothing changed: nothing of Stem is installed in ${ROOT:-/}"
    elif ((DRY_RUN)); then
        say "Dry run: ${#CHANGED[@]} removal(s) would be made; nothing was changed"
    else
        say "Uninstalled from ${ROOT:-/}: ${#CHANGED[@]} change(s)"
    fi
}

main() {
    parse_args "$@"
    umask 022
    trap cleanup EXIT
    trap 'on_error $LINENO' ERR
    preflight
    if ((DRY_RUN)); then
        say "Dry run: printing every step, changing nothing"
    fi
    if ((UNINSTALL)); then
        do_uninstall
    else
        do_install
    fi
}

main "$@"
