"""model versions name their artifact by a URI in the model store

Revision ID: 0003
Revises: 0002

A model store may be remote (s3://, gs://, ...), so a version's artifact is
named by a URI, `artifact_uri`. Rows registered before keep working: their
local path becomes the file:// URI of the same folder. `artifact_path` stays,
nullable, and is still written for file:// artifacts, so code older than this
migration keeps loading them during a rolling upgrade; it is NULL for a remote
artifact, which older code could not load anyway.
"""

from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def _as_uri(path: str) -> str:
    """A plain absolute path as its file:// URI; anything else as it is."""
    return Path(path).as_uri() if path.startswith("/") else path


def upgrade() -> None:
    op.add_column('model_registry', sa.Column('artifact_uri', sa.Text(), nullable=True))
    conn = op.get_bind()
    # Path.as_uri percent-encodes what a URI must (spaces, %, #): done here, not in SQL.
    for version, path in conn.execute(sa.text("SELECT version, artifact_path FROM model_registry")).all():
        conn.execute(sa.text("UPDATE model_registry SET artifact_uri = :uri WHERE version = :version"),
                     {"uri": _as_uri(path), "version": version})
    op.alter_column('model_registry', 'artifact_uri', nullable=False)
    op.alter_column('model_registry', 'artifact_path', nullable=True)


def downgrade() -> None:
    # A remote artifact keeps its URI in artifact_path: the older code names it when it
    # fails to load it, rather than losing the row.
    from urllib.parse import unquote, urlsplit

    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT version, artifact_uri FROM model_registry WHERE artifact_path IS NULL")).all()
    for version, uri in rows:
        path = unquote(urlsplit(uri).path) if uri.startswith("file://") else uri
        conn.execute(sa.text("UPDATE model_registry SET artifact_path = :path WHERE version = :version"),
                     {"path": path, "version": version})
    op.alter_column('model_registry', 'artifact_path', nullable=False)
    op.drop_column('model_registry', 'artifact_uri')
