-- The ten items sold in the largest quantities, with their orders and revenue.
SELECT
  product_id,
  ANY_VALUE(product_name) AS product_name,
  SUM(quantity) AS units,
  COUNT(DISTINCT order_id) AS orders,
  ROUND(SUM(price * quantity), 2) AS revenue
FROM clickflow.purchase_items
GROUP BY product_id
ORDER BY units DESC, product_id
LIMIT 10
