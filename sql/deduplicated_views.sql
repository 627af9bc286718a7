-- One row per key: views over the four tables for sinks that store at least once. The
-- bigquery_write sink's default mode has no insertId, so a message Pub/Sub delivers again (after a
-- worker died before acknowledging it) is appended again, with the same keys as the first time.
-- Run once per dataset; query visits_unique, events_unique, purchase_items_unique and
-- dead_letter_unique instead of the tables. The first copy (by ingestion time) is kept.
CREATE OR REPLACE VIEW clickflow.visits_unique AS
SELECT * FROM clickflow.visits
WHERE TRUE
QUALIFY ROW_NUMBER() OVER (PARTITION BY visit_id ORDER BY ingested_at) = 1;

CREATE OR REPLACE VIEW clickflow.events_unique AS
SELECT * FROM clickflow.events
WHERE TRUE
QUALIFY ROW_NUMBER() OVER (PARTITION BY event_id ORDER BY ingested_at) = 1;

CREATE OR REPLACE VIEW clickflow.purchase_items_unique AS
SELECT * FROM clickflow.purchase_items
WHERE TRUE
QUALIFY ROW_NUMBER() OVER (PARTITION BY event_id, item_index ORDER BY ingested_at) = 1;

CREATE OR REPLACE VIEW clickflow.dead_letter_unique AS
SELECT * FROM clickflow.dead_letter
WHERE TRUE
QUALIFY ROW_NUMBER() OVER (PARTITION BY dead_letter_id ORDER BY received_at) = 1;
