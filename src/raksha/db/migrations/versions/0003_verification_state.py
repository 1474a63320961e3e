"""The scheduled verification's results: vault_services.verifications (its recent passes) and each run's
verify_state, verified_at and verify_note.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from raksha.db.types import UtcDateTime

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('vault_services') as batch:
        batch.add_column(sa.Column('verifications', sa.JSON(), nullable=True))
    with op.batch_alter_table('backupjobruns') as batch:
        batch.add_column(sa.Column('verify_state', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('verified_at', UtcDateTime(), nullable=True))
        batch.add_column(sa.Column('verify_note', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('backupjobruns') as batch:
        batch.drop_column('verify_note')
        batch.drop_column('verified_at')
        batch.drop_column('verify_state')
    with op.batch_alter_table('vault_services') as batch:
        batch.drop_column('verifications')
