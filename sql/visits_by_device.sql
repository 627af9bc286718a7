-- Visits per device type.
SELECT
  device_type,
  COUNT(*) AS visits
FROM clickflow.visits
GROUP BY device_type
ORDER BY visits DESC, device_type
