"""The Raksha schema as SQLAlchemy 2 typed ORM models (docs/design/database.md).

Table and column names follow the seed and its 2013 code: ``backupjobs``,
``backupjob_vms``, ``backupjobruns`` (``backuptype``), ``backupjobrun_vms``,
``backupjobrun_vm_resources``, ``vm_resource_backups`` (the seed's columns exactly),
``vault_services``; plus ``restores``. Schedules are columns of ``backupjobs``.

Every table has a uuid string ``id``, ``created_at``/``updated_at`` (aware UTC),
and soft deletion (``deleted`` flag + ``deleted_at``): rows are never removed by
the service (``raksha db purge`` removes those deleted long ago). Tenant-owned rows
carry ``project_id`` (children too, so every query can be scoped without a join);
top-level resources also ``user_id``. Statuses are
plain strings checked by raksha.domain.states, not database enums, so a new status
needs no migration.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from raksha.db.types import UtcDateTime, utcnow

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}

ID = String(36)
STATUS = String(32)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {
        datetime: UtcDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
        str: String(255),
        int: Integer(),
        bool: Boolean(),
    }

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    deleted: Mapped[bool] = mapped_column(default=False)

    def to_dict(self) -> dict[str, Any]:
        """The row's columns (not its relationships) by name."""
        return {c.key: getattr(self, c.key) for c in self.__mapper__.column_attrs}

    def __repr__(self) -> str:
        status = getattr(self, "status", None)
        return f"<{type(self).__name__} {self.id}{' ' + status if status else ''}>"


class Progress:
    """The progress of long work (a run, a restore), written at most once a second while it works."""

    progress_percent: Mapped[int] = mapped_column(default=0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger, default=None)
    eta_seconds: Mapped[int | None] = mapped_column(default=None)


class VaultService(Base):
    """Where backups are stored. ``project_id`` NULL: offered to every project (set up by an operator)."""

    __tablename__ = "vault_services"

    project_id: Mapped[str | None] = mapped_column(index=True, default=None)
    user_id: Mapped[str | None] = mapped_column(default=None)
    name: Mapped[str]
    description: Mapped[str | None] = mapped_column(Text, default=None)
    type: Mapped[str] = mapped_column(String(16))  # local | swift | s3
    url: Mapped[str] = mapped_column(String(2048))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # backend settings; never secrets in clear
    # The recent scheduled verification passes over its vault, newest first (raksha.domain.verify_coverage).
    verifications: Mapped[list[Any] | None] = mapped_column(default=None)


class BackupJob(Base):
    """A named set of VMs and the policy they are protected by (the seed's ``backupjob``)."""

    __tablename__ = "backupjobs"
    __table_args__ = (Index(None, "project_id", "created_at"),)

    project_id: Mapped[str]
    user_id: Mapped[str]
    name: Mapped[str]
    description: Mapped[str | None] = mapped_column(Text, default=None)
    status: Mapped[str] = mapped_column(STATUS, default="available")
    vault_service_id: Mapped[str | None] = mapped_column(ID, ForeignKey("vault_services.id"), default=None)
    # Schedule (the seed's "job scheduler for periodic backups"): an interval (the 2013 client's ``hours``)
    # or a cron expression; every ``full_every``-th run is full (0: full only when there is no parent).
    schedule_interval_seconds: Mapped[int | None] = mapped_column(default=None)
    schedule_cron: Mapped[str | None] = mapped_column(String(255), default=None)
    schedule_enabled: Mapped[bool] = mapped_column(default=True)
    full_every: Mapped[int] = mapped_column(default=0)
    next_run_at: Mapped[datetime | None] = mapped_column(index=True, default=None)
    runs_started: Mapped[int] = mapped_column(default=0)
    retention: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    excluded_disks: Mapped[dict[str, Any] | None] = mapped_column(default=None)  # {vm_id: [target, ...]}
    consistency: Mapped[str | None] = mapped_column(String(16), default=None)  # wanted: crash|filesystem|application
    # The run in progress, set and cleared by compare-and-set: never two runs of one job at once.
    active_run_id: Mapped[str | None] = mapped_column(ID, default=None)

    vault_service: Mapped[VaultService | None] = relationship(lazy="raise")
    vms: Mapped[list[BackupJobVm]] = relationship(
        back_populates="backupjob", lazy="raise",
        primaryjoin="and_(BackupJob.id == BackupJobVm.backupjob_id, BackupJobVm.deleted == False)",
        order_by="BackupJobVm.created_at", viewonly=True)


class BackupJobVm(Base):
    """A VM of a job: a libvirt domain name or UUID, or a Nova instance id in a cloud."""

    __tablename__ = "backupjob_vms"

    project_id: Mapped[str] = mapped_column(index=True)
    backupjob_id: Mapped[str] = mapped_column(ID, ForeignKey("backupjobs.id"), index=True)
    vm_id: Mapped[str]
    vm_name: Mapped[str | None] = mapped_column(default=None)

    backupjob: Mapped[BackupJob] = relationship(back_populates="vms", lazy="raise")


class BackupJobRun(Progress, Base):
    """One point in time of every VM of a job (the seed's ``backupjobrun``)."""

    __tablename__ = "backupjobruns"
    __table_args__ = (Index(None, "project_id", "created_at"), Index(None, "backupjob_id", "status"))

    project_id: Mapped[str]
    user_id: Mapped[str]
    backupjob_id: Mapped[str] = mapped_column(ID, ForeignKey("backupjobs.id"))
    name: Mapped[str | None] = mapped_column(default=None)
    description: Mapped[str | None] = mapped_column(Text, default=None)
    backuptype: Mapped[str] = mapped_column(String(32))  # full | incremental
    status: Mapped[str] = mapped_column(STATUS, default="queued")
    parent_run_id: Mapped[str | None] = mapped_column(ID, ForeignKey("backupjobruns.id"), default=None)
    consistency: Mapped[str | None] = mapped_column(String(16), default=None)  # reached: crash|filesystem|application
    freeze_ms: Mapped[int | None] = mapped_column(default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # The scheduled verification's word on its data (domain.states.VerifyState; NULL: not every pack read yet).
    verify_state: Mapped[str | None] = mapped_column(String(16), default=None)
    verified_at: Mapped[datetime | None] = mapped_column(default=None)
    verify_note: Mapped[str | None] = mapped_column(Text, default=None)  # what was found damaged

    backupjob: Mapped[BackupJob] = relationship(lazy="raise")
    vms: Mapped[list[BackupJobRunVm]] = relationship(back_populates="backupjobrun", lazy="raise",
                                                     order_by="BackupJobRunVm.created_at")


class BackupJobRunVm(Base):
    """A VM of a run: what it reached and what it stored."""

    __tablename__ = "backupjobrun_vms"

    project_id: Mapped[str] = mapped_column(index=True)
    backupjobrun_id: Mapped[str] = mapped_column(ID, ForeignKey("backupjobruns.id"), index=True)
    vm_id: Mapped[str]  # the domain UUID (libvirt) or instance id (Nova)
    vm_name: Mapped[str | None] = mapped_column(default=None)
    status: Mapped[str] = mapped_column(STATUS, default="queued")
    consistency: Mapped[str | None] = mapped_column(String(16), default=None)
    consistency_note: Mapped[str | None] = mapped_column(Text, default=None)  # why not more
    excluded_disks: Mapped[list[Any] | None] = mapped_column(default=None)
    warnings: Mapped[list[Any] | None] = mapped_column(default=None)  # what the backup left for the next run
    bytes_read: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_stored: Mapped[int] = mapped_column(BigInteger, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    backupjobrun: Mapped[BackupJobRun] = relationship(back_populates="vms", lazy="raise")
    resources: Mapped[list[BackupJobRunVmResource]] = relationship(
        back_populates="backupjobrun_vm", lazy="raise", order_by="BackupJobRunVmResource.resource_name")


class BackupJobRunVmResource(Base):
    """A resource (a disk) of a VM of a run."""

    __tablename__ = "backupjobrun_vm_resources"

    project_id: Mapped[str] = mapped_column(index=True)
    backupjobrun_id: Mapped[str] = mapped_column(ID, ForeignKey("backupjobruns.id"), index=True)
    backupjobrun_vm_id: Mapped[str] = mapped_column(ID, ForeignKey("backupjobrun_vms.id"), index=True)
    resource_type: Mapped[str] = mapped_column(String(32), default="disk")
    resource_name: Mapped[str]  # the disk's target: vda, sdb
    status: Mapped[str] = mapped_column(STATUS, default="queued")
    backuptype: Mapped[str | None] = mapped_column(String(32), default=None)  # a disk may fall back to full
    bus: Mapped[str | None] = mapped_column(String(32), default=None)
    disk_format: Mapped[str | None] = mapped_column(String(32), default=None)
    size: Mapped[int | None] = mapped_column(BigInteger, default=None)  # virtual size in bytes
    source_path: Mapped[str | None] = mapped_column(Text, default=None)
    tracking: Mapped[str | None] = mapped_column(Text, default=None)  # how its changes were found
    consistency: Mapped[str | None] = mapped_column(String(16), default=None)
    bytes_read: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_stored: Mapped[int] = mapped_column(BigInteger, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)

    backupjobrun_vm: Mapped[BackupJobRunVm] = relationship(back_populates="resources", lazy="raise")
    backups: Mapped[list[VmResourceBackup]] = relationship(back_populates="backupjobrun_vm_resource", lazy="raise",
                                                           order_by="VmResourceBackup.created_at")


class VmResourceBackup(Base):
    """A resource's data in the vault; the seed's record, with its columns exactly (plus bytes and ids).

    ``vm_resource_backup_backing_id`` is NULL for a full backup and the backing backup for an
    incremental; ``top`` marks the newest backup of the resource in the run.
    """

    __tablename__ = "vm_resource_backups"

    project_id: Mapped[str] = mapped_column(index=True)
    backupjobrun_vm_resource_id: Mapped[str] = mapped_column(
        ID, ForeignKey("backupjobrun_vm_resources.id"), index=True)
    vm_resource_backup_backing_id: Mapped[str | None] = mapped_column(
        ID, ForeignKey("vm_resource_backups.id"), index=True, default=None)
    top: Mapped[bool] = mapped_column(default=True)
    vault_service_id: Mapped[str | None] = mapped_column(ID, default=None)
    vault_service_url: Mapped[str | None] = mapped_column(Text, default=None)
    vault_service_metadata: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    status: Mapped[str] = mapped_column(STATUS, default="creating")
    vault_backup_id: Mapped[str | None] = mapped_column(String(512), default=None)  # job/run/vm/disk in the vault
    bytes_read: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_stored: Mapped[int] = mapped_column(BigInteger, default=0)

    backupjobrun_vm_resource: Mapped[BackupJobRunVmResource] = relationship(back_populates="backups", lazy="raise")


class Restore(Progress, Base):
    """A restore of a run (all of it, or selected VMs and disks) to new VMs, files or in place."""

    __tablename__ = "restores"
    __table_args__ = (Index(None, "project_id", "created_at"),)

    project_id: Mapped[str]
    user_id: Mapped[str]
    backupjobrun_id: Mapped[str] = mapped_column(ID, ForeignKey("backupjobruns.id"), index=True)
    name: Mapped[str | None] = mapped_column(default=None)
    description: Mapped[str | None] = mapped_column(Text, default=None)
    restore_type: Mapped[str] = mapped_column(String(16))  # new_vm | files | in_place
    selection: Mapped[dict[str, Any] | None] = mapped_column(default=None)  # VMs and disks; None: everything
    target: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    status: Mapped[str] = mapped_column(STATUS, default="queued")
    results: Mapped[dict[str, Any] | None] = mapped_column(default=None)  # what it produced, and verification
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    backupjobrun: Mapped[BackupJobRun] = relationship(lazy="raise")
