-- A plain Date beside ts, as Databricks' inference tables have, for analysts' GROUP BY date and
-- partition-friendly filters; computed by ClickHouse, so writers never send it.
ALTER TABLE {database}.inference ADD COLUMN IF NOT EXISTS date Date MATERIALIZED toDate(ts) AFTER ts;
