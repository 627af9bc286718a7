"use strict";
// Polls /api/live and redraws; no framework, one charting library (uPlot).
(function () {
  const fmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
  const $ = (id) => document.getElementById(id);
  const text = (id, value) => { $(id).textContent = value; };
  let pageViews = null, revenue = null, refreshMs = 1000, pageViewsTop = 1;

  const short = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });
  // Every time on the page is UTC, as event times, the watermark and alerts are; not the browser's zone.
  const hhmm = (ms) => new Date(ms).toISOString().slice(11, 16);

  function axisStyle(extra) {
    return Object.assign({ stroke: "#8a94ad", grid: { stroke: "#26304a" }, ticks: { stroke: "#26304a" },
                           size: 56, values: (u, ticks) => ticks.map((v) => short.format(v)) }, extra || {});
  }

  // uPlot's time tick labels by tick spacing (its own table's layout), in 24-hour time: a label,
  // then the line under it where the date (or the hour, for seconds) changes
  const TIME_TICKS = [
    [86400, "{M}/{D}", "\n{YYYY}", null, null, null, null, null, 1],
    [60, "{HH}:{mm}", "\n{M}/{D}/{YY}", null, "\n{M}/{D}", null, null, null, 1],
    [1, ":{ss}", "\n{M}/{D}/{YY} {HH}:{mm}", null, "\n{M}/{D} {HH}:{mm}", null, "\n{HH}:{mm}", null, 1],
  ];

  // extra: more uPlot options (scales, hooks); x is a time scale, in UTC, whatever else a chart sets on it
  function lineChart(el, series, height, axes, extra) {
    const scales = Object.assign({}, extra.scales);
    scales.x = Object.assign({ time: true }, scales.x);
    const opts = Object.assign({
      width: el.clientWidth, height: height, tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
      axes: [axisStyle({ values: TIME_TICKS, size: 50 })].concat(axes || [axisStyle()]),
      series: [{ value: "{HH}:{mm}:{ss}" }].concat(series),
    }, extra, { scales: scales });
    return new uPlot(opts, [[]].concat(series.map(() => [])), el);
  }

  // The page views chart's y axis fits the page views; a threshold joins it only once the busiest
  // minute shown reaches half of it, so a distant ceiling does not flatten the traffic.
  function chartTop(counts, thresholds) {
    const busiest = Math.max(1, ...counts);
    const near = thresholds.filter((t) => t !== null && t <= 2 * busiest);
    return Math.ceil(1.1 * Math.max(busiest, ...near));
  }

  function bars(id, entries) {
    const list = $(id);
    list.replaceChildren();
    if (!entries.length) {
      const li = document.createElement("li");
      li.className = "empty"; li.textContent = "none yet"; list.append(li);
      return;
    }
    const max = Math.max(...entries.map((e) => e[1]), 1);
    for (const [label, n] of entries) {
      const li = document.createElement("li");
      const fill = document.createElement("div");
      fill.className = "fill"; fill.style.width = (100 * n / max) + "%";
      const name = document.createElement("span"); name.textContent = label; name.title = label;
      const count = document.createElement("span"); count.className = "n"; count.textContent = fmt.format(n);
      li.append(fill, name, count); list.append(li);
    }
  }

  // Which minute the tile shows, or (before any has closed) when the first will: a minute closes
  // once the watermark, allowed_lateness behind the newest event, passes its end.
  function lastMinuteHint(closed, minutes) {
    if (closed.length) return "the minute of " + hhmm(Date.parse(closed[closed.length - 1].minute));
    if (!minutes.length) return "";
    return "first once the watermark passes " + hhmm(Date.parse(minutes[0].minute) + 60000);
  }

  function render(live) {
    refreshMs = 1000 * (live.refresh_seconds || 1);
    text("watermark", live.watermark ? live.watermark.replace("T", " ").replace("Z", "") : "–");
    text("updated", live.generated_at.slice(11, 19));
    text("messages-rate", fmt.format(live.throughput.messages_per_second));
    text("events-rate", fmt.format(live.throughput.events_per_second));
    text("messages-total", fmt.format(live.totals.messages));
    text("events-total", fmt.format(live.totals.events));
    const closed = live.page_views_per_minute.filter((m) => m.closed);
    text("last-minute", closed.length ? fmt.format(closed[closed.length - 1].page_views) : "–");
    text("last-minute-at", lastMinuteHint(closed, live.page_views_per_minute));
    const lag = live.ingestion_lag_seconds;
    text("lag", lag.p50 === null ? "–" : fmt.format(lag.p50) + " s / " + fmt.format(lag.p99) + " s");

    const firing = live.alerts.filter((a) => a.firing);
    const banner = $("alert-banner");
    banner.className = "banner " + (firing.length ? "firing" : "ok");
    banner.textContent = firing.length ? "ALERT: " + firing.map((a) => a.name).join(", ") : "no alert firing";

    const minutes = live.page_views_per_minute.map((m) => Date.parse(m.minute) / 1000);
    const views = live.page_views_per_minute.map((m) => m.page_views);
    const thresholds = live.alerts.map((a) => minutes.map(() => a.threshold));
    if (!pageViews) {
      pageViews = lineChart($("page-views-chart"), [
        { label: "page views", stroke: "#4f9dff", width: 2, fill: "rgba(79,157,255,.12)" },
      ].concat(live.alerts.map((a) => ({ label: a.name, stroke: "#ff5c6c", width: 1.5, dash: [6, 4] }))), 260,
      undefined, {
        scales: { y: { range: () => [0, pageViewsTop] } },
        // the axis top as drawn, for whoever checks it (the browser test)
        hooks: { setScale: [(u, key) => {
          if (key === "y") $("page-views-chart").dataset.top = String(u.scales.y.max);
        }] },
      });
    }
    pageViewsTop = chartTop(views, live.alerts.map((a) => a.threshold));
    pageViews.setData([minutes, views].concat(thresholds));

    if (!revenue) {
      revenue = lineChart($("revenue-chart"), [
        // bars: on axes that scale alike, two lines would lie on each other
        { label: "purchases", stroke: "#3ccf8e", fill: "rgba(60,207,142,.35)", width: 1,
          paths: uPlot.paths.bars({ size: [0.5, 48] }), points: { show: false } },
        { label: "revenue", stroke: "#ffb547", width: 2, scale: "usd" },
      ], 200, [axisStyle(), axisStyle({ scale: "usd", side: 1, grid: { show: false },
                                        values: (u, ticks) => ticks.map((v) => "$" + short.format(v)) })],
      // room for the end bars; with no minute yet, no range (not the seconds around 1970)
      { scales: { x: { range: (u, min, max) => (min === null ? [null, null] : [min - 15, max + 15]) } } });
    }
    revenue.setData([minutes, live.purchases_per_minute.map((m) => m.purchases),
                     live.purchases_per_minute.map((m) => m.revenue)]);

    text("clicks-window", "last " + live.clicks_by_page.window_minutes + " minutes");
    bars("clicks-by-page", live.clicks_by_page.pages.map((p) => [p.page, p.page_views]));
    bars("dead-letters", Object.entries(live.dead_letters_by_reason));
    bars("events-by-type", Object.entries(live.events_by_type));
    bars("visits-by-device", Object.entries(live.visits_by_device));

    const body = $("alerts").querySelector("tbody");
    body.replaceChildren();
    for (const a of live.alerts) {
      const row = document.createElement("tr");
      const name = document.createElement("td");  // a long name may wrap after its underscores
      a.name.split("_").forEach((part, i) => { if (i) name.append("_", document.createElement("wbr")); name.append(part); });
      row.append(name);
      for (const [value, cls] of [[a.kind], [a.firing ? "FIRING" : "ok", a.firing ? "firing" : "ok"],
                                  [fmt.format(a.value)], [a.threshold === null ? "learning" : fmt.format(a.threshold)]]) {
        const cell = document.createElement("td"); cell.textContent = value; if (cls) cell.className = cls; row.append(cell);
      }
      if (a.minute) {  // the value is its busiest minute's since it fired, not the tile's last full minute
        const when = document.createElement("div"); when.className = "hint"; when.textContent = hhmm(Date.parse(a.minute));
        row.cells[3].append(when);
      }
      body.append(row);
    }
    if (!live.alerts.length) {
      const row = document.createElement("tr"); const cell = document.createElement("td");
      cell.colSpan = 5; cell.className = "empty"; cell.textContent = "no alert rules configured"; row.append(cell); body.append(row);
    }
    const log = $("transitions");
    log.replaceChildren(...live.recent_transitions.slice(-6).reverse().map((t) => {
      const li = document.createElement("li");
      li.textContent = hhmm(Date.parse(t.minute)) + "  " + t.alert + " " + t.state + " at " + fmt.format(t.value) + " page views";
      return li;
    }));
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  }

  async function poll() {
    try {
      const answer = await fetch("/api/live", { cache: "no-store" });
      if (answer.ok) render(await answer.json());
    } catch (error) {
      text("updated", "unreachable");
    }
    setTimeout(poll, refreshMs);
  }

  window.addEventListener("resize", () => {
    for (const [chart, id] of [[pageViews, "page-views-chart"], [revenue, "revenue-chart"]]) {
      if (chart) chart.setSize({ width: $(id).clientWidth, height: chart.height });
    }
  });
  poll();
})();
