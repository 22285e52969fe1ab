// The live market page: REST for history, /v1/feed for everything live. Plain JS, no build step.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const state = { market: null, interval: params.get("interval") || "1m", seq: {}, bids: new Map(), asks: new Map(),
                  trades: [], preemptions: [], ws: null, retry: 500 };
  const toNum = (s) => (s === null || s === undefined ? null : Number(s));
  const t = (iso) => Math.floor(Date.parse(iso) / 1000);
  const hhmmss = (iso) => new Date(iso).toISOString().substring(11, 19);
  const money = (s) => (s === null || s === undefined ? "–" : "$" + s);

  // --- the chart: candles and volume -------------------------------------------------------------
  const LWC = window.LightweightCharts;
  const chart = LWC.createChart($("chart"), {
    autoSize: true,
    layout: { background: { color: "#161c24" }, textColor: "#9aa5b1" },
    grid: { vertLines: { color: "#1f2a36" }, horzLines: { color: "#1f2a36" } },
    timeScale: { timeVisible: true, secondsVisible: false, borderColor: "#243040" },
    rightPriceScale: { borderColor: "#243040" },
  });
  const candles = chart.addSeries(LWC.CandlestickSeries, {
    upColor: "#26a69a", downColor: "#ef5350", borderVisible: false, wickUpColor: "#26a69a", wickDownColor: "#ef5350",
    priceFormat: { type: "price", precision: 2, minMove: 0.01 },
  });
  const volume = chart.addSeries(LWC.HistogramSeries, { priceFormat: { type: "volume" }, priceScaleId: "", color: "#3b4b5e" });
  volume.priceScale().applyOptions({ scaleMargins: { top: 0.8, bottom: 0 } });
  candles.priceScale().applyOptions({ scaleMargins: { top: 0.1, bottom: 0.25 } });

  const bar = (c) => ({ time: t(c.t), open: toNum(c.open), high: toNum(c.high), low: toNum(c.low), close: toNum(c.close) });
  const vol = (c) => ({ time: t(c.t), value: c.volume_gpu_h, color: toNum(c.close) >= toNum(c.open) ? "rgba(38,166,154,.5)" : "rgba(239,83,80,.5)" });

  async function loadCandles() {
    const [model, tier] = splitMarket(state.market);
    const r = await fetch(`/v1/markets/${model}/${tier}/candles?interval=${state.interval}&limit=500`);
    const body = await r.json();
    candles.setData(body.items.map(bar));
    volume.setData(body.items.map(vol));
    chart.timeScale().fitContent();
    document.body.dataset.candles = String(body.items.length);
  }

  // --- book, trades, ticker ----------------------------------------------------------------------
  function setBook(data) {
    state.bids = new Map(data.bids.map((l) => [l.price, l.gpus]));
    state.asks = new Map(data.asks.map((l) => [l.price, l.gpus]));
  }
  function applyBook(data) {
    for (const [side, map] of [["bids", state.bids], ["asks", state.asks]]) {
      for (const l of data[side] || []) { if (l.gpus > 0) map.set(l.price, l.gpus); else map.delete(l.price); }
    }
  }
  function renderBook() {
    const asks = [...state.asks].sort((a, b) => toNum(a[0]) - toNum(b[0])).slice(0, 14);
    const bids = [...state.bids].sort((a, b) => toNum(b[0]) - toNum(a[0])).slice(0, 14);
    let cum = 0;
    const askRows = asks.map(([p, g]) => [p, g, (cum += g)]);
    cum = 0;
    const bidRows = bids.map(([p, g]) => [p, g, (cum += g)]);
    const max = Math.max(1, ...askRows.map((r) => r[2]), ...bidRows.map((r) => r[2]));
    const row = ([p, g, c]) => `<tr><td class="px">${p}</td><td>${g}</td><td>${c}</td>` +
      `<td class="bar"><div class="fill" style="width:${(100 * c / max).toFixed(1)}%"></div></td></tr>`;
    $("asks").innerHTML = "<tr><th>ask</th><th>GPUs</th><th>cum.</th><th></th></tr>" + askRows.reverse().map(row).join("");
    $("bids").innerHTML = "<tr><th>bid</th><th>GPUs</th><th>cum.</th><th></th></tr>" + bidRows.map(row).join("");
    const bb = bids.length ? toNum(bids[0][0]) : null, ba = asks.length ? toNum(asks[0][0]) : null;
    $("spread").textContent = bb !== null && ba !== null ? `spread ${(ba - bb).toFixed(2)} · call auction each tick` : "call auction each tick";
    $("book-seq").textContent = "seq " + (state.seq.book ?? "–");
    document.body.dataset.book = String(state.bids.size + state.asks.size);
  }
  function renderTrades() {
    $("trades").innerHTML = state.trades.slice(-40).reverse().map((x) =>
      `<tr><td>${hhmmss(x.at)}</td><td>${x.price}</td><td>${x.gpus}</td><td>${x.gpu_hours}</td></tr>`).join("");
    $("preemptions").innerHTML = state.preemptions.slice(-40).reverse().map((p) =>
      `<tr><td>${hhmmss(p.at)}</td><td class="down">${p.reason}</td><td>${p.gpus}</td><td>#${p.lease_id}</td></tr>`).join("")
      || `<tr><td colspan="4" class="muted">none in view</td></tr>`;
  }
  function renderTicker(k) {
    if (!k) return;
    $("t-last").textContent = money(k.last);
    const offered = k.gpus_offered ?? 0, leased = k.gpus_leased ?? 0;
    $("t-util").textContent = `${leased} / ${offered}` + (offered ? ` (${(100 * leased / offered).toFixed(0)}%)` : "");
    const ch = $("t-change");
    ch.textContent = k.change_24h === null ? "–" : `${k.change_24h} (${k.change_24h_pct.toFixed(2)}%)`;
    ch.className = k.change_24h === null ? "" : (toNum(k.change_24h) >= 0 ? "up" : "down");
    $("t-ind").textContent = money(k.indicative);
    $("t-bidask").textContent = `${k.best_bid ?? "–"} / ${k.best_ask ?? "–"}`;
    $("t-vol").textContent = `${k.volume_24h_gpu_h.toFixed(1)} GPU-h`;
    const r = k.risk;
    $("t-risk").textContent = `${(100 * r.preempted_share).toFixed(1)}% · ${r.hazard_per_h.toFixed(3)}/h`;
  }

  function onCandle(c) {
    candles.update(bar(c));
    volume.update(vol(c));
  }

  // --- the feed ----------------------------------------------------------------------------------
  function connect() {
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/feed");
    state.ws = ws;
    ws.onopen = () => {
      state.retry = 500;
      $("conn").textContent = "live"; $("conn").className = "conn live";
      subscribe();
    };
    ws.onclose = (e) => {
      $("conn").textContent = "reconnecting… " + (e.reason || ""); $("conn").className = "conn";
      setTimeout(connect, state.retry = Math.min(state.retry * 2, 10000));
    };
    ws.onmessage = (e) => onMessage(JSON.parse(e.data));
  }
  function subscribe() {
    state.seq = {};
    state.ws.send(JSON.stringify({ op: "subscribe", channels: ["ticker", "book", "trades", "candles"], markets: [state.market] }));
  }
  async function resync(msg) {
    // A gap: the book from its REST snapshot (which carries its seq), the other channels re-subscribed.
    if (msg.channel === "book") {
      const [model, tier] = splitMarket(state.market);
      const book = await (await fetch(`/v1/markets/${model}/${tier}/book`)).json();
      setBook(book); state.seq.book = book.seq; renderBook();
    } else {
      delete state.seq[msg.channel];
      // Subscribing again to what is subscribed is a no-op: leave, then subscribe for a fresh snapshot.
      state.ws.send(JSON.stringify({ op: "unsubscribe", channels: [msg.channel], markets: [state.market] }));
      state.ws.send(JSON.stringify({ op: "subscribe", channels: [msg.channel], markets: [state.market] }));
    }
  }
  function onMessage(msg) {
    if (msg.type === "heartbeat" || msg.type === "error") { if (msg.type === "error") console.warn(msg.data); return; }
    if (msg.market !== state.market) return;
    const ch = msg.channel;
    if (msg.type === "snapshot") {
      state.seq[ch] = msg.seq;
      if (ch === "book") { setBook(msg.data); renderBook(); }
      else if (ch === "ticker") renderTicker(msg.data);
      else if (ch === "trades") { state.trades = msg.data.trades; state.preemptions = msg.data.preemptions; renderTrades(); }
      return; // candles: the chart has its history from REST; updates follow
    }
    if (state.seq[ch] === undefined || msg.seq <= state.seq[ch]) return;
    if (msg.seq !== state.seq[ch] + 1) { resync(msg); return; }
    state.seq[ch] = msg.seq;
    if (ch === "book") { applyBook(msg.data); renderBook(); }
    else if (ch === "ticker") renderTicker(msg.data);
    else if (ch === "trades") {
      state.trades = state.trades.concat(msg.data.trades).slice(-200);
      state.preemptions = state.preemptions.concat(msg.data.preemptions).slice(-100);
      renderTrades();
    } else if (ch === "candles" && msg.data[state.interval]) onCandle(msg.data[state.interval]);
  }

  // --- markets and controls ----------------------------------------------------------------------
  function splitMarket(m) { const i = m.lastIndexOf("/"); return [encodeURIComponent(m.slice(0, i)), m.slice(i + 1)]; }

  async function selectMarket(m) {
    if (state.ws && state.ws.readyState === 1 && state.market) {
      state.ws.send(JSON.stringify({ op: "unsubscribe", channels: ["ticker", "book", "trades", "candles"], markets: [state.market] }));
    }
    state.market = m; state.trades = []; state.preemptions = []; state.bids = new Map(); state.asks = new Map();
    // The market lives in the URL's fragment (`/#H100-80GB/spot`): a link or a reload opens that market.
    const u = new URL(location.href); u.searchParams.delete("market"); u.hash = m; history.replaceState(null, "", u);
    document.body.dataset.market = m;
    await loadCandles();
    if (state.ws && state.ws.readyState === 1) subscribe();
  }

  document.querySelectorAll("button[data-interval]").forEach((b) => b.addEventListener("click", async () => {
    document.querySelectorAll("button[data-interval]").forEach((x) => x.classList.toggle("active", x === b));
    state.interval = b.dataset.interval;
    await loadCandles();
  }));
  document.querySelectorAll("button[data-interval]").forEach((x) => x.classList.toggle("active", x.dataset.interval === state.interval));
  $("market").addEventListener("change", (e) => selectMarket(e.target.value));
  // Editing the fragment (or following a link to another market) switches the market in place.
  window.addEventListener("hashchange", () => {
    const m = decodeURIComponent(location.hash.slice(1));
    if (m && m !== state.market && [...$("market").options].some((o) => o.value === m)) {
      $("market").value = m; selectMarket(m);
    }
  });

  (async function start() {
    const markets = await (await fetch("/v1/markets")).json();
    const sel = $("market");
    sel.innerHTML = markets.map((m) => `<option>${m.id}</option>`).join("");
    // `/#MODEL/tier` selects the market; `?market=` (older links) still works.
    const wanted = decodeURIComponent(location.hash.slice(1)) || params.get("market");
    const first = markets.find((m) => m.id === wanted) || markets.find((m) => m.last_price !== null) || markets[0];
    if (!first) { $("conn").textContent = "no markets yet"; return; }
    sel.value = first.id;
    await selectMarket(first.id);
    connect();
  })();
})();
