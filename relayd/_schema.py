"""The store's schema, as an append-only list of migrations.

Migration ``i`` (1-based) takes the schema from ``user_version = i - 1`` to ``i``. Never edit a
migration that has shipped: add a new one. The store applies missing migrations at start, each
in its own transaction, and refuses to open a database whose version is newer than this list.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: clients, refresh-token families, revoked access tokens.
    """
    CREATE TABLE clients (
        uuid TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        -- scrypt hash of the client secret; empty once the client is deleted.
        secret_hash TEXT NOT NULL,
        roles TEXT NOT NULL,               -- space-separated, e.g. 'client' or 'client admin'
        created_at REAL NOT NULL,
        -- Access and refresh tokens issued before this instant are refused ("revoke all").
        tokens_valid_after REAL NOT NULL,
        -- A deleted client keeps its row as a tombstone so its UUID is never issued again.
        deleted_at REAL
    ) WITHOUT ROWID;

    -- One row per login: each refresh rotates current_jti; presenting an older jti of the
    -- family is reuse, which revokes the family (OAuth 2.0 Security BCP, refresh rotation).
    CREATE TABLE refresh_families (
        family TEXT PRIMARY KEY,
        client_uuid TEXT NOT NULL REFERENCES clients(uuid) ON DELETE CASCADE,
        current_jti TEXT NOT NULL,
        created_at REAL NOT NULL,
        rotated_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        revoked_at REAL,
        revoked_reason TEXT
    ) WITHOUT ROWID;
    CREATE INDEX refresh_families_by_client ON refresh_families (client_uuid);

    -- Single access tokens revoked by jti (operator tokens have no client to revoke).
    -- Rows are useless after expires_at and are purged.
    CREATE TABLE revoked_tokens (
        jti TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        revoked_at REAL NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 2: the durable message queue. A row lives from acceptance until its final status is
    # known and told (or no longer worth keeping); see relayd/_relay/records.py.
    """
    CREATE TABLE messages (
        -- Allocated by the relay when it accepts the message, so seq order is send order.
        -- AUTOINCREMENT keeps the high-water mark in sqlite_sequence even when the newest
        -- rows are purged: a restarted relay continues above it and never reuses a seq.
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        sender TEXT NOT NULL,
        msgid TEXT NOT NULL,
        recipient TEXT NOT NULL,
        high INTEGER NOT NULL,
        acknowledge INTEGER NOT NULL,
        fields TEXT NOT NULL,              -- the 13 fields as JSON; emptied once final
        accepted_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        status TEXT,                       -- NULL while queued, else the final status
        reason TEXT NOT NULL DEFAULT '',
        finished_at REAL,
        receipt_pending INTEGER NOT NULL DEFAULT 0,  -- final status not yet told to the sender
        UNIQUE (sender, msgid)             -- deduplication of re-sent messages
    );
    CREATE INDEX messages_queued ON messages (recipient, seq) WHERE status IS NULL;
    CREATE INDEX messages_expiring ON messages (expires_at) WHERE status IS NULL;
    CREATE INDEX messages_receipts ON messages (sender, seq) WHERE receipt_pending = 1;
    CREATE INDEX messages_finished ON messages (finished_at) WHERE status IS NOT NULL;

    -- Undelivered messages per recipient, kept by triggers in the same transaction as the
    -- messages themselves: the queue_full check is one lookup, not a count of the queue.
    CREATE TABLE queue_counts (
        recipient TEXT PRIMARY KEY,
        queued INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TRIGGER queue_counts_insert AFTER INSERT ON messages WHEN NEW.status IS NULL
    BEGIN
        INSERT INTO queue_counts (recipient, queued) VALUES (NEW.recipient, 1)
        ON CONFLICT (recipient) DO UPDATE SET queued = queued + 1;
    END;
    CREATE TRIGGER queue_counts_finish AFTER UPDATE OF status ON messages
    WHEN OLD.status IS NULL AND NEW.status IS NOT NULL
    BEGIN
        UPDATE queue_counts SET queued = queued - 1 WHERE recipient = OLD.recipient;
    END;
    CREATE TRIGGER queue_counts_delete AFTER DELETE ON messages WHEN OLD.status IS NULL
    BEGIN
        UPDATE queue_counts SET queued = queued - 1 WHERE recipient = OLD.recipient;
    END;
    """,
    # 3: one-time invite codes (auth.registration = "invite"). Only the code's SHA-256 is
    # stored; the code itself is shown once, to the admin who minted it.
    """
    CREATE TABLE invites (
        id TEXT PRIMARY KEY,               -- hex SHA-256 of the code
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL,
        used_by TEXT
    ) WITHOUT ROWID;
    """,
    # 4: message content encrypted at rest (relayd/_atrest.py): the key a row's fields are
    # encrypted with; NULL for rows written before (sealed at the next start) or emptied.
    """
    ALTER TABLE messages ADD COLUMN key_id TEXT;
    """,
    # 5: the end-to-end key directory (relayd/_keys.py): each client's public keys, current
    # and superseded, who read them, and the key changes those readers have not been told yet.
    # Clients are never deleted (tombstones), so their keys are removed explicitly.
    """
    CREATE TABLE client_keys (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        client_uuid TEXT NOT NULL REFERENCES clients(uuid) ON DELETE CASCADE,
        algorithm TEXT NOT NULL,           -- 'x25519' or 'ed25519'
        key BLOB NOT NULL,                 -- the raw public key bytes
        fingerprint TEXT NOT NULL,         -- SHA-256 of key, lowercase hex
        published_at REAL NOT NULL,
        superseded_at REAL                 -- NULL while it is the current key
    );
    -- One current key per client and algorithm.
    CREATE UNIQUE INDEX client_keys_current ON client_keys (client_uuid, algorithm)
        WHERE superseded_at IS NULL;
    CREATE INDEX client_keys_by_client ON client_keys (client_uuid, id);

    -- The clients that read a client's keys: its correspondents, told of key changes.
    CREATE TABLE key_readers (
        client_uuid TEXT NOT NULL,
        reader_uuid TEXT NOT NULL,
        read_at REAL NOT NULL,
        PRIMARY KEY (client_uuid, reader_uuid)
    ) WITHOUT ROWID;
    CREATE INDEX key_readers_by_reader ON key_readers (reader_uuid);

    -- A key change a reader has not been told yet: one row per (reader, client, algorithm),
    -- the latest change; previous is the fingerprint the reader was last told of (or read).
    CREATE TABLE key_notices (
        reader_uuid TEXT NOT NULL,
        client_uuid TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        previous TEXT NOT NULL,
        changed_at REAL NOT NULL,
        PRIMARY KEY (reader_uuid, client_uuid, algorithm)
    ) WITHOUT ROWID;
    CREATE INDEX key_notices_by_client ON key_notices (client_uuid);
    """,
    # 6: one stored message, N deliveries. A message (its sender, msgid, content) is stored
    # once; each recipient's copy of it is a delivery with its own seq, attempts and status.
    # A message's id is the seq of its first delivery, so the rows written before (one
    # recipient each) keep their seq, and content sealed at rest stays bound to the same
    # (id, sender, recipient, msgid): ``address`` is the recipient it was sent to.
    """
    CREATE TABLE messages_v6 (
        id INTEGER PRIMARY KEY,            -- the seq of its first delivery
        sender TEXT NOT NULL,
        msgid TEXT NOT NULL,
        address TEXT NOT NULL,             -- whom it was sent to: a client's uuid
        high INTEGER NOT NULL,
        acknowledge INTEGER NOT NULL,
        fields TEXT NOT NULL,              -- the 13 fields as JSON; emptied once all are final
        key_id TEXT,                       -- the key fields are encrypted with (relayd/_atrest.py)
        accepted_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        -- The message's conversation_id, in plain text as msgid is: history filters by it.
        conversation_id TEXT,
        UNIQUE (sender, msgid)             -- deduplication of re-sent messages
    );
    CREATE INDEX messages_by_msgid ON messages_v6 (msgid);
    CREATE INDEX messages_accepted ON messages_v6 (accepted_at);

    CREATE TABLE deliveries (
        -- Allocated when the message is accepted, so seq order is send order. AUTOINCREMENT
        -- keeps the high-water mark in sqlite_sequence even when the newest rows are purged:
        -- a restarted relay continues above it and never reuses a seq.
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message INTEGER NOT NULL,          -- messages.id
        sender TEXT NOT NULL,              -- the message's, for the receipts index
        recipient TEXT NOT NULL,
        expires_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        status TEXT,                       -- NULL while queued, else the final status
        reason TEXT NOT NULL DEFAULT '',
        finished_at REAL,
        receipt_pending INTEGER NOT NULL DEFAULT 0, -- final status not yet told to the sender
        delivered_at REAL,                 -- first written to the recipient
        read_at REAL,                      -- the recipient said it read it
        conversation_id TEXT,              -- the message's, for history's indexes
        read_pending INTEGER NOT NULL DEFAULT 0, -- the read receipt not yet told to the sender
        -- The recipient read it with read receipts off: its sender is never shown read_at.
        read_hidden INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO messages_v6 (id, sender, msgid, address, high, acknowledge, fields, key_id,
                             accepted_at, expires_at)
        SELECT seq, sender, msgid, recipient, high, acknowledge, fields, key_id, accepted_at,
               expires_at FROM messages;
    INSERT INTO deliveries (seq, message, sender, recipient, expires_at, attempts, status,
                            reason, finished_at, receipt_pending, delivered_at)
        SELECT seq, seq, sender, recipient, expires_at, attempts, status, reason, finished_at,
               receipt_pending, CASE WHEN status = 'delivered' THEN finished_at END
        FROM messages;
    -- The high-water mark moves over too: purged rows' seqs are never used again.
    INSERT INTO sqlite_sequence (name, seq)
        SELECT 'deliveries', 0 WHERE NOT EXISTS
            (SELECT 1 FROM sqlite_sequence WHERE name = 'deliveries');
    UPDATE sqlite_sequence SET seq = max(seq, coalesce(
        (SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)) WHERE name = 'deliveries';
    DROP TABLE messages;
    ALTER TABLE messages_v6 RENAME TO messages;

    CREATE INDEX deliveries_queued ON deliveries (recipient, seq) WHERE status IS NULL;
    CREATE INDEX deliveries_expiring ON deliveries (expires_at) WHERE status IS NULL;
    CREATE INDEX deliveries_receipts ON deliveries (sender, seq)
        WHERE receipt_pending = 1 OR read_pending = 1;
    CREATE INDEX deliveries_finished ON deliveries (finished_at) WHERE status IS NOT NULL;
    CREATE INDEX deliveries_by_message ON deliveries (message);
    -- History: what a client received, what it sent, and either with one peer, by seq.
    CREATE INDEX deliveries_inbox ON deliveries (recipient, seq);
    CREATE INDEX deliveries_sent ON deliveries (sender, seq);
    CREATE INDEX deliveries_inbox_from ON deliveries (recipient, sender, seq);
    CREATE INDEX deliveries_inbox_conversation ON deliveries (recipient, conversation_id, seq)
        WHERE conversation_id IS NOT NULL;
    CREATE INDEX deliveries_sent_conversation ON deliveries (sender, conversation_id, seq)
        WHERE conversation_id IS NOT NULL;

    -- Whether the client's reads are told to their senders (PUT /clients/{uuid}/read-receipts).
    ALTER TABLE clients ADD COLUMN read_receipts INTEGER NOT NULL DEFAULT 1;

    CREATE TRIGGER queue_counts_insert AFTER INSERT ON deliveries WHEN NEW.status IS NULL
    BEGIN
        INSERT INTO queue_counts (recipient, queued) VALUES (NEW.recipient, 1)
        ON CONFLICT (recipient) DO UPDATE SET queued = queued + 1;
    END;
    CREATE TRIGGER queue_counts_finish AFTER UPDATE OF status ON deliveries
    WHEN OLD.status IS NULL AND NEW.status IS NOT NULL
    BEGIN
        UPDATE queue_counts SET queued = queued - 1 WHERE recipient = OLD.recipient;
    END;
    CREATE TRIGGER queue_counts_delete AFTER DELETE ON deliveries WHEN OLD.status IS NULL
    BEGIN
        UPDATE queue_counts SET queued = queued - 1 WHERE recipient = OLD.recipient;
    END;
    """,
    # 7: topics (rooms). A topic's history is its published messages: ``topic`` and its
    # ``topic_offset`` stay with a message for good (its deliveries are a topic's: no receipt
    # per subscriber); ``in_history`` while the topic keeps it (its content is kept then,
    # whatever its deliveries' states). See relayd/_store_topics.py.
    """
    CREATE TABLE topics (
        id TEXT PRIMARY KEY,
        creator TEXT NOT NULL,
        metadata TEXT NOT NULL,            -- a JSON object, as its creator gave it
        access TEXT NOT NULL,              -- open or private
        publish TEXT NOT NULL,             -- members or owner
        presence INTEGER NOT NULL,
        history_count INTEGER NOT NULL,
        history_age REAL NOT NULL,
        created_at REAL NOT NULL,
        subscribers INTEGER NOT NULL,
        last_offset INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX topics_by_creator ON topics (creator);

    CREATE TABLE topic_members (
        topic TEXT NOT NULL,
        client TEXT NOT NULL,
        joined_at REAL NOT NULL,
        PRIMARY KEY (topic, client)
    ) WITHOUT ROWID;
    CREATE INDEX topic_members_by_client ON topic_members (client);

    ALTER TABLE messages ADD COLUMN topic TEXT;
    ALTER TABLE messages ADD COLUMN topic_offset INTEGER;
    ALTER TABLE messages ADD COLUMN in_history INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX messages_in_topic ON messages (topic, topic_offset) WHERE in_history = 1;
    CREATE INDEX messages_by_sender_in_history ON messages (sender) WHERE in_history = 1;

    -- When the client last had a live socket (the directory's last_seen).
    ALTER TABLE clients ADD COLUMN last_seen REAL;

    -- A topic's (or a broadcast's) delivery: its publisher's sent history lists the message
    -- once (in the topic's history), not once per subscriber.
    ALTER TABLE deliveries ADD COLUMN fanout INTEGER NOT NULL DEFAULT 0;
    DROP INDEX deliveries_sent;
    CREATE INDEX deliveries_sent ON deliveries (sender, seq) WHERE fanout = 0;
    DROP INDEX deliveries_sent_conversation;
    CREATE INDEX deliveries_sent_conversation ON deliveries (sender, conversation_id, seq)
        WHERE conversation_id IS NOT NULL AND fanout = 0;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
