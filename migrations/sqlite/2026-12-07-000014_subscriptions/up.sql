-- Subscriptions (issue 24). The Subscription resources themselves are stored like any
-- resource (sealed); these tables hold what delivery needs beside them.
--
-- One row per subscription a client wrote: whose grant its notifications are filtered by
-- (`owner`: subject, client, scopes, patient context; set by the last client write of the
-- Subscription, never by the server's own status updates), and the delivery state every node's
-- workers share (a lease, the event counter, failures and the next attempt).
CREATE TABLE subscription_state (
    subscription_id    TEXT PRIMARY KEY,
    owner              TEXT NOT NULL,
    status             TEXT NOT NULL,
    events_since_start BIGINT NOT NULL DEFAULT 0,
    failures           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    TIMESTAMP,
    lease_owner        TEXT,
    lease_until        TIMESTAMP,
    last_sent_at       TIMESTAMP,
    last_error         TEXT,
    updated_at         TIMESTAMP NOT NULL
);

-- The outbox: a matched write, inserted in the write's own transaction (so a match is never
-- lost and never recorded for a write that rolled back). Event numbers are given by the
-- delivering worker, in outbox order, when it first sends the event; `sent_at` once the endpoint
-- answered 2xx; `dropped` when delivery found the event outside the owner's grant or, for a
-- deletion, the filter no longer matching the deleted version.
CREATE TABLE subscription_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    subscription_id TEXT NOT NULL,
    resource_type   TEXT NOT NULL,
    logical_id      TEXT NOT NULL,
    version_id      BIGINT NOT NULL,
    event           TEXT NOT NULL,
    recorded        TIMESTAMP NOT NULL,
    event_number    BIGINT,
    sent_at         TIMESTAMP,
    dropped         BOOLEAN NOT NULL DEFAULT FALSE
);
-- what waits for delivery, in order (delivered rows stay for `$events` and are not in it)
CREATE INDEX subscription_outbox_pending ON subscription_outbox (subscription_id, id)
    WHERE sent_at IS NULL AND NOT dropped;
CREATE UNIQUE INDEX subscription_outbox_numbers ON subscription_outbox (subscription_id, event_number);
