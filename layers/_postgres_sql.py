"""The SQL of the PostgreSQL layer: its schema (tables and functions) and its statements.

Every name carries the layer's table prefix, so layers under different prefixes share nothing
(tables, sequence, functions, NOTIFY channel, advisory locks). See `layers.postgres` for why the
schema is as it is.
"""

from __future__ import annotations

import zlib

SCHEMA_VERSION = 6  # bump when the schema or a function changes; migration re-runs it all
LOCK_CLASS = 0x67617465  # first key of every advisory lock this layer takes ("gate")
RELEASED = "released"  # notification "released <channel>": a consumer gave its messages back
GROUP_NOTICE = "group"  # notification "group <GroupNotice JSON>": acks, nacks, extends, deletes


def schema(p: str, publish_lock: int) -> str:
    """The tables and functions; every statement is idempotent."""
    return f"""
CREATE TABLE IF NOT EXISTS {p}schema (version integer NOT NULL);

CREATE SEQUENCE IF NOT EXISTS {p}message_ids AS bigint CACHE 1;

CREATE TABLE IF NOT EXISTS {p}messages (
    id bigint PRIMARY KEY,
    channel text COLLATE "C" NOT NULL,
    event text NOT NULL,
    data text NOT NULL,
    published_at double precision NOT NULL,
    expires_at double precision
);
CREATE INDEX IF NOT EXISTS {p}messages_by_channel ON {p}messages (channel, id);
CREATE INDEX IF NOT EXISTS {p}messages_by_expiry ON {p}messages (expires_at)
    WHERE expires_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS {p}trimmed (
    channel text COLLATE "C" PRIMARY KEY,
    max_deleted_id bigint NOT NULL
);
-- The channel has no row at or below this id: the size trim deleted all of them. The next trim
-- deletes from there up, and never walks the index over rows deleted before.
ALTER TABLE {p}trimmed ADD COLUMN IF NOT EXISTS trimmed_to bigint NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS {p}groups (
    channel text COLLATE "C" NOT NULL,
    group_name text NOT NULL,
    last_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, group_name)
);

CREATE TABLE IF NOT EXISTS {p}consumers (
    channel text COLLATE "C" NOT NULL,
    group_name text NOT NULL,
    consumer text NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, group_name, consumer)
);

CREATE TABLE IF NOT EXISTS {p}pending (
    channel text COLLATE "C" NOT NULL,
    group_name text NOT NULL,
    message_id bigint NOT NULL,
    consumer text NOT NULL,
    delivered_at timestamptz NOT NULL DEFAULT now(),
    deliveries integer NOT NULL DEFAULT 1,
    PRIMARY KEY (channel, group_name, message_id)
);

CREATE TABLE IF NOT EXISTS {p}idempotency_keys (
    channel text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    message_id bigint NOT NULL,
    fingerprint text NOT NULL,
    expires_at double precision NOT NULL,
    PRIMARY KEY (channel, key)
);
CREATE INDEX IF NOT EXISTS {p}idempotency_keys_by_expiry ON {p}idempotency_keys (expires_at);

DROP FUNCTION IF EXISTS {p}publish(text[], text[], text[], double precision[], double precision[]);

-- With `keys`, a message whose key is recorded (unexpired) on its channel is not published: its
-- id comes back negated. A recorded key with another fingerprint publishes nothing and returns
-- {{0, <index of the message>, <recorded id>}} (ids are never 0).
CREATE OR REPLACE FUNCTION {p}publish(
    channels text[], events text[], payloads text[],
    published double precision[], expires double precision[],
    keys text[] DEFAULT NULL, fingerprints text[] DEFAULT NULL,
    key_ttl double precision DEFAULT NULL
) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    -- Held until commit, so ids become visible in the order they are taken.
    PERFORM pg_advisory_xact_lock({LOCK_CLASS}, {publish_lock});
    IF keys IS NOT NULL THEN
        RETURN {p}publish_keyed(channels, events, payloads, published, expires, keys,
                                 fingerprints, key_ttl);
    END IF;
    FOR i IN 1 .. cardinality(channels) LOOP
        ids[i] := nextval('{p}message_ids');
    END LOOP;
    INSERT INTO {p}messages (id, channel, event, data, published_at, expires_at)
        SELECT * FROM unnest(ids, channels, events, payloads, published, expires);
    -- The id, not the message: NOTIFY payloads are limited to 8,000 bytes.
    PERFORM pg_notify('{p}messages', ids[cardinality(ids)]::text);
    RETURN ids;
END $$;

-- Called by {p}publish under its lock, which serialises every publish: a key looked up here
-- cannot be recorded by another transaction before this one commits. No two messages of a call
-- share a channel and key (the layer sends each once).
CREATE OR REPLACE FUNCTION {p}publish_keyed(
    channels text[], events text[], payloads text[], published double precision[],
    expires double precision[], keys text[], fingerprints text[], key_ttl double precision
) RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
    clash integer;
    fresh integer[] := '{{}}';
BEGIN
    -- One look-up for the whole call: each message's recorded id, negated (NULL if none).
    SELECT array_agg(-k.message_id ORDER BY s.i), min(s.i) FILTER (WHERE k.fingerprint <> s.f)
        INTO ids, clash
        FROM unnest(channels, keys, fingerprints, published)
            WITH ORDINALITY AS s(channel, key, f, published_at, i)
        LEFT JOIN {p}idempotency_keys k ON k.channel = s.channel AND k.key = s.key
            AND k.expires_at > s.published_at;
    IF clash IS NOT NULL THEN
        RETURN ARRAY[0, clash, -ids[clash]];
    END IF;
    FOR i IN 1 .. cardinality(channels) LOOP
        IF ids[i] IS NULL THEN
            ids[i] := nextval('{p}message_ids');
            fresh := fresh || i;
        END IF;
    END LOOP;
    IF cardinality(fresh) = 0 THEN
        RETURN ids;
    END IF;
    INSERT INTO {p}messages (id, channel, event, data, published_at, expires_at)
        SELECT ids[i], channels[i], events[i], payloads[i], published[i], expires[i]
        FROM unnest(fresh) AS i;
    INSERT INTO {p}idempotency_keys AS k (channel, key, message_id, fingerprint, expires_at)
        SELECT channels[i], keys[i], ids[i], fingerprints[i], published[i] + key_ttl
        FROM unnest(fresh) AS i WHERE keys[i] IS NOT NULL
        ON CONFLICT (channel, key) DO UPDATE  -- an expired record the cleanup has not deleted
        SET message_id = excluded.message_id, fingerprint = excluded.fingerprint,
            expires_at = excluded.expires_at;
    PERFORM pg_notify('{p}messages', ids[fresh[cardinality(fresh)]]::text);
    RETURN ids;
END $$;

CREATE OR REPLACE FUNCTION {p}touch_consumer(ch text, grp text, who text)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO {p}consumers (channel, group_name, consumer) VALUES (ch, grp, who)
    ON CONFLICT (channel, group_name, consumer) DO UPDATE SET seen_at = now();
$$;

CREATE OR REPLACE FUNCTION {p}group_read(ch text, grp text, who text, n integer)
RETURNS SETOF {p}messages LANGUAGE plpgsql AS $$
DECLARE
    after_id bigint;
    ids bigint[];
BEGIN
    -- Every live message wakes every consumer of its channel: find out whether there is
    -- anything to read before taking (and so writing) the lock on the group row.
    SELECT g.last_id INTO after_id FROM {p}groups g WHERE g.channel = ch AND g.group_name = grp;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', MESSAGE = 'unknown consumer group';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM {p}messages m WHERE m.channel = ch AND m.id > after_id) THEN
        RETURN;
    END IF;
    -- The lock makes each new message go to exactly one consumer, whichever process it is in;
    -- ids are visible in order, so "id > cursor" skips nothing.
    SELECT g.last_id INTO after_id FROM {p}groups g
        WHERE g.channel = ch AND g.group_name = grp FOR UPDATE;
    SELECT array_agg(m.id ORDER BY m.id) INTO ids FROM (
        SELECT m.id FROM {p}messages m WHERE m.channel = ch AND m.id > after_id
        ORDER BY m.id LIMIT n
    ) m;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    UPDATE {p}groups g SET last_id = ids[cardinality(ids)]
        WHERE g.channel = ch AND g.group_name = grp;
    PERFORM {p}touch_consumer(ch, grp, who);
    INSERT INTO {p}pending (channel, group_name, message_id, consumer)
        SELECT ch, grp, unnest(ids), who;
    RETURN QUERY SELECT m.* FROM {p}messages m WHERE m.id = ANY(ids) ORDER BY m.id;
END $$;

CREATE OR REPLACE FUNCTION {p}group_claim(
    ch text, grp text, who text, min_idle double precision, n integer
) RETURNS TABLE (
    claimed_id bigint, claimed_deliveries integer, claimed_event text, claimed_data text,
    claimed_published_at double precision
) LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    PERFORM 1 FROM {p}groups g WHERE g.channel = ch AND g.group_name = grp;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', MESSAGE = 'unknown consumer group';
    END IF;
    PERFORM {p}touch_consumer(ch, grp, who);
    -- SKIP LOCKED: consumers claiming at the same moment take different messages.
    SELECT array_agg(s.message_id) INTO ids FROM (
        SELECT p.message_id FROM {p}pending p
        WHERE p.channel = ch AND p.group_name = grp
          AND p.delivered_at <= now() - make_interval(secs => min_idle)
        ORDER BY p.message_id LIMIT n
        FOR UPDATE SKIP LOCKED
    ) s;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    -- The history bound deleted these: they can never be delivered again.
    DELETE FROM {p}pending p
        WHERE p.channel = ch AND p.group_name = grp AND p.message_id = ANY(ids)
          AND NOT EXISTS (SELECT 1 FROM {p}messages m WHERE m.id = p.message_id);
    RETURN QUERY
    UPDATE {p}pending p
        SET consumer = who, delivered_at = now(), deliveries = p.deliveries + 1
        FROM {p}messages m
        WHERE p.channel = ch AND p.group_name = grp AND p.message_id = ANY(ids)
          AND m.id = p.message_id
        RETURNING p.message_id, p.deliveries, m.event, m.data, m.published_at;
END $$;
"""


class Statements:
    """The SQL of one table prefix, built once."""

    def __init__(self, p: str) -> None:
        subscribed = "(m.channel = ANY($2::text[]) OR m.channel LIKE ANY($3::text[]))"
        self.publish = f"SELECT {p}publish($1, $2, $3, $4, $5)"
        self.publish_keyed = f"SELECT {p}publish($1, $2, $3, $4, $5, $6, $7, $8)"
        self.expire_keys = f"DELETE FROM {p}idempotency_keys WHERE expires_at <= $1"
        self.max_id = f"SELECT coalesce(max(id), 0) FROM {p}messages"
        self.last_issued = (
            f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {p}message_ids"
        )
        self.read_new = f"""
            SELECT m.id, m.channel, m.event, m.data, m.published_at FROM {p}messages m
            WHERE m.id > $1 AND m.id <= $2
              AND (m.channel = ANY($3::text[]) OR m.channel LIKE ANY($4::text[]))
            ORDER BY m.id LIMIT $5"""
        # A message is retained while fewer than history_size newer ones share its channel and
        # it has not expired. Counting only rows after the cursor gives the same rank, since
        # every newer row is after the cursor too.
        candidates = f"""
            SELECT m.id, m.channel, m.event, m.data, m.published_at, m.expires_at,
                   row_number() OVER (PARTITION BY m.channel ORDER BY m.id DESC) AS recency
            FROM {p}messages m WHERE m.id > $1 AND {subscribed}"""
        retained = "c.recency <= $4 AND (c.expires_at IS NULL OR c.expires_at > $5)"
        select_retained = f"""
            SELECT c.id, c.channel, c.event, c.data, c.published_at FROM ({candidates}) c
            WHERE {retained}"""
        self.retained_after = f"{select_retained} ORDER BY c.id LIMIT $6"
        self.retained_last = f"{select_retained} ORDER BY c.id DESC LIMIT $6"  # with $1 = 0
        self.evicted_after = f"""
            SELECT EXISTS (SELECT 1 FROM ({candidates}) c WHERE NOT ({retained}))
                OR EXISTS (
                    SELECT 1 FROM {p}trimmed m WHERE m.max_deleted_id > $1 AND {subscribed})"""
        # Each deletion notes the channel's highest deleted id, in the same statement.
        note_trimmed = f"""
            noted AS (
                INSERT INTO {p}trimmed AS t (channel, max_deleted_id)
                SELECT channel, max(id) FROM gone GROUP BY channel
                ON CONFLICT (channel)
                DO UPDATE SET max_deleted_id = greatest(t.max_deleted_id, excluded.max_deleted_id)
            )"""
        # Every row at or below the edge goes, so the next trim starts above it (`trimmed_to`):
        # rows committed later have higher ids (see `layers.postgres`).
        self.trim_to_size = f"""
            WITH edges AS (
                SELECT c.name, e.id, coalesce(t.trimmed_to, 0) AS low
                FROM unnest($1::text[]) AS c(name)
                CROSS JOIN LATERAL (
                    SELECT m.id FROM {p}messages m WHERE m.channel = c.name
                    ORDER BY m.id DESC OFFSET $2 LIMIT 1
                ) AS e
                LEFT JOIN {p}trimmed t ON t.channel = c.name
            ), gone AS (
                DELETE FROM {p}messages m USING edges
                WHERE m.channel = edges.name AND m.id > edges.low AND m.id <= edges.id
                RETURNING m.channel, m.id
            ), noted AS (
                INSERT INTO {p}trimmed AS t (channel, max_deleted_id, trimmed_to)
                SELECT e.name, coalesce(g.id, 0), e.id FROM edges e
                LEFT JOIN (SELECT channel, max(id) AS id FROM gone GROUP BY channel) g
                    ON g.channel = e.name
                ON CONFLICT (channel) DO UPDATE SET
                    max_deleted_id = greatest(t.max_deleted_id, excluded.max_deleted_id),
                    trimmed_to = greatest(t.trimmed_to, excluded.trimmed_to)
            )
            SELECT count(*) FROM gone"""
        self.expire = f"""
            WITH gone AS (
                DELETE FROM {p}messages WHERE id IN (
                    -- The order makes the plan read the partial index on expires_at: without
                    -- statistics (a new table, no autovacuum yet), a bare LIMIT is planned as a
                    -- sequential scan that reads the whole table when nothing has expired.
                    SELECT id FROM {p}messages WHERE expires_at <= $1 ORDER BY expires_at
                    LIMIT $2 FOR UPDATE SKIP LOCKED
                )
                RETURNING channel, id
            ), {note_trimmed}
            SELECT count(*) FROM gone"""
        # A new group starts after the newest committed message (ids are visible in order, so
        # everything committed later has a higher id), or after the position $3.
        self.create_group = f"""
            INSERT INTO {p}groups (channel, group_name, last_id)
            VALUES ($1, $2, coalesce($3::bigint, (SELECT coalesce(max(id), 0) FROM {p}messages)))
            ON CONFLICT (channel, group_name) DO NOTHING"""
        self.touch_consumer = f"SELECT {p}touch_consumer($1, $2, $3)"
        self.forget_consumers = f"""
            DELETE FROM {p}consumers c
            WHERE c.seen_at < now() - make_interval(secs => $1)
              AND NOT EXISTS (
                  SELECT 1 FROM {p}pending p WHERE p.channel = c.channel
                      AND p.group_name = c.group_name AND p.consumer = c.consumer)"""
        self.leave = f"""
            UPDATE {p}consumers SET seen_at = now()
            WHERE channel = $1 AND group_name = $2 AND consumer = $3"""
        # Its pending rows stay: the group's other consumers claim them after the ack timeout.
        self.forget = f"""
            DELETE FROM {p}consumers WHERE channel = $1 AND group_name = $2 AND consumer = $3"""
        self.release = f"""
            WITH released AS (
                UPDATE {p}pending SET delivered_at = '-infinity'
                WHERE channel = $1 AND group_name = $2 AND consumer = $3
                RETURNING 1
            )
            SELECT pg_notify('{p}messages', '{RELEASED} ' || $1)
            WHERE EXISTS (SELECT 1 FROM released)"""
        # A nack: claimable by the next claim whatever its idle time, and every process is told.
        self.nack = f"""
            WITH nacked AS (
                UPDATE {p}pending SET delivered_at = '-infinity'
                WHERE channel = $1 AND group_name = $2 AND message_id = ANY($3::bigint[])
                RETURNING message_id
            ), told AS (
                SELECT pg_notify('{p}messages', '{RELEASED} ' || $1)
                WHERE EXISTS (SELECT 1 FROM nacked)
            )
            SELECT message_id FROM nacked, (SELECT count(*) FROM told) t"""
        self.extend = f"""
            UPDATE {p}pending SET delivered_at = now()
            WHERE channel = $1 AND group_name = $2 AND message_id = ANY($3::bigint[])
            RETURNING message_id"""
        self.delete_group = f"""
            WITH pending AS (
                DELETE FROM {p}pending WHERE channel = $1 AND group_name = $2
            ), consumers AS (
                DELETE FROM {p}consumers WHERE channel = $1 AND group_name = $2
            )
            DELETE FROM {p}groups WHERE channel = $1 AND group_name = $2 RETURNING 1"""
        self.notify = f"SELECT pg_notify('{p}messages', '{GROUP_NOTICE} ' || $1)"
        self.group_read = f"SELECT * FROM {p}group_read($1, $2, $3, $4)"
        self.group_claim = f"SELECT * FROM {p}group_claim($1, $2, $3, $4, $5)"
        self.group_exists = (
            f"SELECT EXISTS (SELECT 1 FROM {p}groups WHERE channel = $1 AND group_name = $2)"
        )
        self.ack = f"""
            DELETE FROM {p}pending
            WHERE channel = $1 AND group_name = $2 AND message_id = ANY($3::bigint[])
            RETURNING message_id"""
        self.group_summary = f"""
            SELECT
                EXISTS (SELECT 1 FROM {p}groups WHERE channel = $1 AND group_name = $2) AS found,
                (SELECT count(*) FROM {p}pending WHERE channel = $1 AND group_name = $2)
                    AS pending,
                oldest.message_id AS oldest_id,
                m.published_at AS oldest_published_at
            FROM (SELECT 1) AS one
            LEFT JOIN LATERAL (
                SELECT message_id FROM {p}pending WHERE channel = $1 AND group_name = $2
                ORDER BY message_id LIMIT 1
            ) AS oldest ON true
            LEFT JOIN {p}messages m ON m.id = oldest.message_id"""
        self.group_consumers = f"""
            SELECT c.consumer,
                   (SELECT count(*) FROM {p}pending p WHERE p.channel = c.channel
                       AND p.group_name = c.group_name AND p.consumer = c.consumer) AS pending,
                   extract(epoch FROM now() - c.seen_at)::double precision AS idle
            FROM {p}consumers c WHERE c.channel = $1 AND c.group_name = $2
            ORDER BY c.consumer"""


def like(pattern: str) -> str:
    """A glob (`*` any run, `?` one character) as a LIKE pattern; `_` and `%` stay literal."""
    out = []
    for char in pattern:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "\\%_":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def lock_key(prefix: str, purpose: str) -> int:
    """A stable signed 32-bit advisory lock key per table prefix and purpose."""
    key = zlib.crc32(f"{prefix}:{purpose}".encode())
    return key - (1 << 32) if key >= (1 << 31) else key
