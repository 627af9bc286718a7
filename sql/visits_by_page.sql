-- Page views and distinct visits per page over the last 30 days (partition-pruned on event_timestamp).
SELECT
  page_url,
  COUNT(*) AS page_views,
  COUNT(DISTINCT visit_id) AS visits
FROM clickflow.events
WHERE event_type = 'page_view'
  AND event_timestamp >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL 30 DAY)
GROUP BY page_url
ORDER BY page_views DESC, page_url
