-- Clicks per page in the last five minutes, for a dashboard tile refreshed every few seconds.
-- A click is an event that names a page (today: page views; cart and purchase events name none).
SELECT
  page_url,
  COUNT(*) AS clicks
FROM clickflow.events
WHERE event_timestamp >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL 5 MINUTE)
  AND page_url IS NOT NULL
GROUP BY page_url
ORDER BY clicks DESC, page_url
