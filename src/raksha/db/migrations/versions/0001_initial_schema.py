"""Initial schema: the seed's tables (backupjobs ... vm_resource_backups), vault services, restores.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from raksha.db.types import UtcDateTime

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('vault_services',
    sa.Column('project_id', sa.String(length=255), nullable=True),
    sa.Column('user_id', sa.String(length=255), nullable=True),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('url', sa.String(length=2048), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', UtcDateTime(), nullable=False),
    sa.Column('updated_at', UtcDateTime(), nullable=False),
    sa.Column('deleted_at', UtcDateTime(), nullable=True),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_vault_services'))
    )
    op.create_index(op.f('ix_vault_services_project_id'), 'vault_services', ['project_id'], unique=False)

    op.create_table('backupjobs',
    sa.Column('project_id', sa.String(length=255), nullable=False),
    sa.Column('user_id', sa.String(length=255), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('vault_service_id', sa.String(length=36), nullable=True),
    sa.Column('schedule_interval_seconds', sa.Integer(), nullable=True),
    sa.Column('schedule_cron', sa.String(length=255), nullable=True),
    sa.Column('schedule_enabled', sa.Boolean(), nullable=False),
    sa.Column('full_every', sa.Integer(), nullable=False),
    sa.Column('next_run_at', UtcDateTime(), nullable=True),
    sa.Column('runs_started', sa.Integer(), nullable=False),
    sa.Column('retention', sa.JSON(), nullable=True),
    sa.Column('excluded_disks', sa.JSON(), nullable=True),
    sa.Column('consistency', sa.String(length=16), nullable=True),
    sa.Column('active_run_id', sa.String(length=36), nullable=True),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', UtcDateTime(), nullable=False),
    sa.Column('updated_at', UtcDateTime(), nullable=False),
    sa.Column('deleted_at', UtcDateTime(), nullable=True),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['vault_service_id'], ['vault_services.id'], name=op.f('fk_backupjobs_vault_service_id')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_backupjobs'))
    )
    op.create_index(op.f('ix_backupjobs_next_run_at'), 'backupjobs', ['next_run_at'], unique=False)
    op.create_index(op.f('ix_backupjobs_project_id_created_at'), 'backupjobs', ['project_id', 'created_at'], unique=False)

    op.create_table('backupjob_vms',
    sa.Column('project_id', sa.String(length=255), nullable=False),
    sa.Column('backupjob_id', sa.String(length=36), nullable=False),
    sa.Column('vm_id', sa.String(length=255), nullable=False),
    sa.Column('vm_name', sa.String(length=255), nullable=True),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', UtcDateTime(), nullable=False),
    sa.Column('updated_at', UtcDateTime(), nullable=False),
    sa.Column('deleted_at', UtcDateTime(), nullable=True),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['backupjob_id'], ['backupjobs.id'], name=op.f('fk_backupjob_vms_backupjob_id')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_backupjob_vms'))
    )
    op.create_index(op.f('ix_backupjob_vms_backupjob_id'), 'backupjob_vms', ['backupjob_id'], unique=False)
    op.create_index(op.f('ix_backupjob_vms_project_id'), 'backupjob_vms', ['project_id'], unique=False)

    op.create_table('backupjobruns',
    sa.Column('project_id', sa.String(length=255), nullable=False),
    sa.Column('user_id', sa.String(length=255), nullable=False),
    sa.Column('backupjob_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('backuptype', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('parent_run_id', sa.String(length=36), nullable=True),
    sa.Column('consistency', sa.String(length=16), nullable=True),
    sa.Column('freeze_ms', sa.Integer(), nullable=True),
    sa.Column('progress_percent', sa.Integer(), nullable=False),
    sa.Column('bytes_done', sa.BigInteger(), nullable=False),
    sa.Column('bytes_total', sa.BigInteger(), nullable=True),
    sa.Column('eta_seconds', sa.Integer(), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('started_at', UtcDateTime(), nullable=True),
    sa.Column('finished_at', UtcDateTime(), nullable=True),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', UtcDateTime(), nullable=False),
    sa.Column('updated_at', UtcDateTime(), nullable=False),
    sa.Column('deleted_at', UtcDateTime(), nullable=True),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['backupjob_id'], ['backupjobs.id'], name=op.f('fk_backupjobruns_backupjob_id')),
    sa.ForeignKeyConstraint(['parent_run_id'], ['backupjobruns.id'], name=op.f('fk_backupjobruns_parent_run_id')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_backupjobruns'))
    )
    op.create_index(op.f('ix_backupjobruns_backupjob_id_status'), 'backupjobruns', ['backupjob_id', 'status'], unique=False)
    op.create_index(op.f('ix_backupjobruns_project_id_created_at'), 'backupjobruns', ['project_id', 'created_at'], unique=False)

    op.create_table('backupjobrun_vms',
    sa.Column('project_id', sa.String(length=255), nullable=False),
    sa.Column('backupjobrun_id', sa.String(length=36), nullable=False),
    sa.Column('vm_id', sa.String(length=255), nullable=False),
    sa.Column('vm_name', sa.String(length=255), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('consistency', sa.String(length=16), nullable=True),
    sa.Column('consistency_note', sa.Text(), nullable=True),
    sa.Column('excluded_disks', sa.JSON(), nullable=True),
    sa.Column('bytes_read', sa.BigInteger(), nullable=False),
    sa.Column('bytes_stored', sa.BigInteger(), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('started_at', UtcDateTime(), nullable=True),
    sa.Column('finished_at', UtcDateTime(), nullable=True),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', UtcDateTime(), nullable=False),
    sa.Column('updated_at', UtcDateTime(), nullable=False),
    sa.Column('deleted_at', UtcDateTime(), nullable=True),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['backupjobrun_id'], ['backupjobruns.id'], name=op.f('fk_backupjobrun_vms_backupjobrun_id')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_backupjobrun_vms'))
    )
    op.create_index(op.f('ix_backupjobrun_vms_backupjobrun_id'), 'backupjobrun_vms', ['backupjobrun_id'], unique=False)
    op.create_index(op.f('ix_backupjobrun_vms_project_id'), 'backupjobrun_vms', ['project_id'], unique=False)

    op.create_table('restores',
    sa.Column('project_id', sa.String(length=255), nullable=False),
    sa.Column('user_id', sa.String(length=255), nullable=False),
    sa.Column('backupjobrun_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('restore_type', sa.String(length=16), nullable=False),
    sa.Column('selection', sa.JSON(), nullable=True),
    sa.Column('target', sa.JSON(), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('results', sa.JSON(), nullable=True),
    sa.Column('progress_percent', sa.Integer(), nullable=False),
    sa.Column('bytes_done', sa.BigInteger(), nullable=False),
    sa.Column('bytes_total', sa.BigInteger(), nullable=True),
    sa.Column('eta_seconds', sa.Integer(), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('started_at', UtcDateTime(), nullable=True),
    sa.Column('finished_at', UtcDateTime(), nullable=True),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', UtcDateTime(), nullable=False),
    sa.Column('updated_at', UtcDateTime(), nullable=False),
    sa.Column('deleted_at', UtcDateTime(), nullable=True),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['backupjobrun_id'], ['backupjobruns.id'], name=op.f('fk_restores_backupjobrun_id')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_restores'))
    )
    op.create_index(op.f('ix_restores_backupjobrun_id'), 'restores', ['backupjobrun_id'], unique=False)
    op.create_index(op.f('ix_restores_project_id_created_at'), 'restores', ['project_id', 'created_at'], unique=False)

    op.create_table('backupjobrun_vm_resources',
    sa.Column('project_id', sa.String(length=255), nullable=False),
    sa.Column('backupjobrun_id', sa.String(length=36), nullable=False),
    sa.Column('backupjobrun_vm_id', sa.String(length=36), nullable=False),
    sa.Column('resource_type', sa.String(length=32), nullable=False),
    sa.Column('resource_name', sa.String(length=255), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('backuptype', sa.String(length=32), nullable=True),
    sa.Column('bus', sa.String(length=32), nullable=True),
    sa.Column('disk_format', sa.String(length=32), nullable=True),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.Column('source_path', sa.Text(), nullable=True),
    sa.Column('tracking', sa.Text(), nullable=True),
    sa.Column('consistency', sa.String(length=16), nullable=True),
    sa.Column('bytes_read', sa.BigInteger(), nullable=False),
    sa.Column('bytes_stored', sa.BigInteger(), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', UtcDateTime(), nullable=False),
    sa.Column('updated_at', UtcDateTime(), nullable=False),
    sa.Column('deleted_at', UtcDateTime(), nullable=True),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['backupjobrun_id'], ['backupjobruns.id'], name=op.f('fk_backupjobrun_vm_resources_backupjobrun_id')),
    sa.ForeignKeyConstraint(['backupjobrun_vm_id'], ['backupjobrun_vms.id'], name=op.f('fk_backupjobrun_vm_resources_backupjobrun_vm_id')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_backupjobrun_vm_resources'))
    )
    op.create_index(op.f('ix_backupjobrun_vm_resources_backupjobrun_id'), 'backupjobrun_vm_resources', ['backupjobrun_id'], unique=False)
    op.create_index(op.f('ix_backupjobrun_vm_resources_backupjobrun_vm_id'), 'backupjobrun_vm_resources', ['backupjobrun_vm_id'], unique=False)
    op.create_index(op.f('ix_backupjobrun_vm_resources_project_id'), 'backupjobrun_vm_resources', ['project_id'], unique=False)

    op.create_table('vm_resource_backups',
    sa.Column('project_id', sa.String(length=255), nullable=False),
    sa.Column('backupjobrun_vm_resource_id', sa.String(length=36), nullable=False),
    sa.Column('vm_resource_backup_backing_id', sa.String(length=36), nullable=True),
    sa.Column('top', sa.Boolean(), nullable=False),
    sa.Column('vault_service_id', sa.String(length=36), nullable=True),
    sa.Column('vault_service_url', sa.Text(), nullable=True),
    sa.Column('vault_service_metadata', sa.JSON(), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('vault_backup_id', sa.String(length=512), nullable=True),
    sa.Column('bytes_read', sa.BigInteger(), nullable=False),
    sa.Column('bytes_stored', sa.BigInteger(), nullable=False),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', UtcDateTime(), nullable=False),
    sa.Column('updated_at', UtcDateTime(), nullable=False),
    sa.Column('deleted_at', UtcDateTime(), nullable=True),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['backupjobrun_vm_resource_id'], ['backupjobrun_vm_resources.id'], name=op.f('fk_vm_resource_backups_backupjobrun_vm_resource_id')),
    sa.ForeignKeyConstraint(['vm_resource_backup_backing_id'], ['vm_resource_backups.id'], name=op.f('fk_vm_resource_backups_vm_resource_backup_backing_id')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_vm_resource_backups'))
    )
    op.create_index(op.f('ix_vm_resource_backups_backupjobrun_vm_resource_id'), 'vm_resource_backups', ['backupjobrun_vm_resource_id'], unique=False)
    op.create_index(op.f('ix_vm_resource_backups_project_id'), 'vm_resource_backups', ['project_id'], unique=False)
    op.create_index(op.f('ix_vm_resource_backups_vm_resource_backup_backing_id'), 'vm_resource_backups', ['vm_resource_backup_backing_id'], unique=False)



def downgrade() -> None:
    # Indexes go with their tables (MySQL refuses to drop one a foreign key needs).
    op.drop_table('vm_resource_backups')
    op.drop_table('backupjobrun_vm_resources')
    op.drop_table('restores')
    op.drop_table('backupjobrun_vms')
    op.drop_table('backupjobruns')
    op.drop_table('backupjob_vms')
    op.drop_table('backupjobs')
    op.drop_table('vault_services')
