-- Page views per minute over the last hour.
SELECT
  TIMESTAMP_TRUNC(event_timestamp, MINUTE) AS minute,
  COUNT(*) AS page_views
FROM clickflow.events
WHERE event_type = 'page_view'
  AND event_timestamp >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL 1 HOUR)
GROUP BY minute
ORDER BY minute
