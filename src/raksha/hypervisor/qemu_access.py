"""Whether QEMU, running as its own user, can reach a path: checked before hours of work depend on it.

libvirt runs QEMU as the user of its DAC security label (``libvirt-qemu`` on Debian, root where
``qemu.conf`` says so; as root it also drops its capabilities, so plain permission bits decide). It
relabels the disk images a domain opens, not the directories on the way to them, which QEMU's user
must be allowed to search.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import xml.etree.ElementTree as ET

import libvirt


def parse_dac_label(text: str) -> tuple[int, int] | None:
    """``"+64055:+64055"`` or ``"libvirt-qemu:kvm"`` as (uid, gid); None if it names no one known here."""
    user, _, group = text.strip().partition(":")
    try:
        uid = int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid
        gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        return None
    return uid, gid


def qemu_user(conn: libvirt.virConnect, virt_type: str) -> tuple[int, int] | None:
    """The uid and gid libvirt starts QEMU with for domains of ``virt_type`` (``qemu``, ``kvm``): the DAC
    base label in the host's capabilities. None when libvirt does not say (no DAC driver)."""
    caps = ET.fromstring(conn.getCapabilities())
    for model in caps.findall("./host/secmodel"):
        if (model.findtext("model") or "") != "dac":
            continue
        for label in model.findall("baselabel"):
            if label.get("type") == virt_type and label.text:
                return parse_dac_label(label.text)
    return None


def blocking_dir(path: str, uid: int, gid: int) -> str | None:
    """The first directory on the way to ``path`` (itself included) that ``uid`` may not search, or None."""
    try:
        groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        groups = {gid}
    folder = os.path.abspath(path)
    chain = [folder]
    while os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
        chain.append(folder)
    for folder in reversed(chain):
        st = os.stat(folder)
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return folder
    return None


def describe(uid: int, gid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid}, gid {gid})"
    except KeyError:
        return f"uid {uid}, gid {gid}"
