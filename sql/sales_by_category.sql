-- Revenue, units and orders per product category.
SELECT
  category,
  ROUND(SUM(price * quantity), 2) AS revenue,
  SUM(quantity) AS units,
  COUNT(DISTINCT order_id) AS orders
FROM clickflow.purchase_items
GROUP BY category
ORDER BY revenue DESC, category
