"""dead letters keep the exact bytes of a payload that is not valid text

Revision ID: 0002
Revises: 0001

A Kafka message may hold any bytes; PostgreSQL text holds neither NUL nor
invalid UTF-8. `payload` stays the text to show (escaped), and `payload_raw`
keeps the original bytes whenever that text is not exactly them, so that a
replay sends what was received. Rows written before have no `payload_raw`:
their `payload` is their original.
"""

from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('dead_letters', sa.Column('payload_raw', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column('dead_letters', 'payload_raw')
