# Sourced by the cluster scripts beside it: install Debian packages that are missing, as root.
#
#   apt_install COMMAND... -- PACKAGE...   installs PACKAGEs unless every COMMAND is already found
#
# Package scripts must not start the daemons they ship (munged, slurmctld, sshd on port 22): the
# test clusters start their own, with their own configuration, and nothing may be left running.
# Debian's invoke-rc.d asks /usr/sbin/policy-rc.d; exit 101 means "do not start". A policy file
# that is already there (Docker images ship one) is left alone; one created here is removed.
# On failure the last line on stderr says why, for the test fixtures to report as a skip reason.

apt_install() {
  local cmds=() pkgs=() c missing=0 policy=/usr/sbin/policy-rc.d created_policy=0 rc=0
  while (($#)) && [[ $1 != -- ]]; do cmds+=("$1"); shift; done
  shift
  pkgs=("$@")
  export PATH=$PATH:/usr/sbin:/sbin
  for c in "${cmds[@]}"; do command -v "$c" >/dev/null 2>&1 || missing=1; done
  ((missing)) || return 0
  if [[ $(id -u) != 0 ]]; then
    echo "cannot install ${pkgs[*]}: not root (run the tests as root, or install them first)" >&2
    return 1
  fi
  command -v apt-get >/dev/null 2>&1 || { echo "cannot install ${pkgs[*]}: no apt-get (not Debian)" >&2; return 1; }
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
  fi
  echo "installing ${pkgs[*]}" >&2
  # Lock timeout: another session's apt-get may hold dpkg's lock for a while.
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q --no-install-recommends)
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${pkgs[@]}" >&2 ||
    { apt-get -o DPkg::Lock::Timeout=600 update -q >&2 &&
      DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${pkgs[@]}" >&2; } || rc=$?
  ((created_policy)) && rm -f "$policy"
  if ((rc)); then
    echo "cannot install ${pkgs[*]}: apt-get failed (exit $rc)" >&2
    return 1
  fi
  for c in "${cmds[@]}"; do
    command -v "$c" >/dev/null 2>&1 || { echo "cannot install ${pkgs[*]}: $c still missing" >&2; return 1; }
  done
}
