// skypipe view: the job's layers on a Leaflet map (no basemap: everything comes from this server).
// window.skypipe exposes the map and state for tests: {map, ready, tilesLoaded, hits}.
(function () {
  "use strict";
  const map = L.map("map", { zoomControl: true, attributionControl: false, maxZoom: 22 });
  const state = { map: map, ready: false, tilesLoaded: 0, tileErrors: 0, hits: null, layers: {} };
  window.skypipe = state;
  const status = document.getElementById("status");
  const hitsBox = document.getElementById("hits");
  const control = L.control.layers(null, null, { collapsed: false }).addTo(map);
  const legend = L.control({ position: "bottomright" });
  const legends = [];
  let hitsLayer = null;

  legend.onAdd = function () {
    const div = L.DomUtil.create("div", "legend");
    div.id = "legend";
    legends.forEach(function (l) {
      const name = L.DomUtil.create("div", "name", div);
      name.textContent = l.title;
      l.entries.forEach(function (e) {
        const row = L.DomUtil.create("div", "", div);
        const sw = L.DomUtil.create("span", "swatch", row);
        sw.style.background = e.color;
        row.appendChild(document.createTextNode(e.name));
      });
    });
    return div;
  };

  function query(params) {
    return Object.keys(params).map(function (k) {
      const v = params[k];
      return Array.isArray(v) ? v.map(function (x) { return k + "=" + encodeURIComponent(x); }).join("&")
                              : k + "=" + encodeURIComponent(v);
    }).join("&");
  }

  function colorFor(props, layer) {
    if (props.score !== undefined) { return "#ff7800"; }
    if (props.class !== undefined && layer.legend) {
      const e = layer.legend.find(function (x) { return x.name === props.class; });
      if (e) { return e.color; }
    }
    return "#e31a1c";
  }

  function addRaster(layer) {
    const url = "/cog/tiles/WebMercatorQuad/{z}/{x}/{y}.png?" + query(Object.assign({ layer: layer.id }, layer.render));
    const b = layer.bounds;
    const tiles = L.tileLayer(url, {
      bounds: [[b[1], b[0]], [b[3], b[2]]], maxZoom: 22, maxNativeZoom: 19, tileSize: 256,
    });
    tiles.on("tileload", function () { state.tilesLoaded += 1; });
    tiles.on("tileerror", function () { state.tileErrors += 1; });
    return tiles;
  }

  function addVector(layer) {
    const group = L.geoJSON(null, {
      style: function (f) { return { color: colorFor(f.properties, layer), weight: 1.5, fillOpacity: 0.25 }; },
      pointToLayer: function (f, latlng) { return L.circleMarker(latlng, { radius: 4 }); },
    });
    fetch("/api/vector/" + layer.id).then(function (r) { return r.json(); }).then(function (g) { group.addData(g); });
    return group;
  }

  function showHits(body) {
    if (hitsLayer) { map.removeLayer(hitsLayer); control.removeLayer(hitsLayer); }
    hitsLayer = L.geoJSON(body, {
      style: function (f) {
        const t = (f.properties.rank - 1) / Math.max(body.features.length, 1);
        return { color: t < 0.1 ? "#ffff00" : "#ff7800", weight: 2, fillOpacity: 0.15 };
      },
    }).addTo(map);
    control.addOverlay(hitsLayer, "similar patches");
    state.hits = body.features.length;
    const best = body.features.slice(0, 5).map(function (f) {
      const p = f.properties;
      return "<tr><td>#" + p.rank + "</td><td>" + p.score.toFixed(4) + "</td><td>mosaic " + p.mosaic +
             "</td><td>" + (p.time_start || "") + "</td></tr>";
    }).join("");
    hitsBox.innerHTML = "<div id='hit-count'>" + body.features.length + " similar patches (search " +
      (1000 * body.seconds.search).toFixed(1) + " ms)</div><table>" + best + "</table>";
  }

  map.on("click", function (e) {
    if (!state.searchable) { return; }
    hitsBox.textContent = "searching…";
    fetch("/api/search?" + query({ lon: e.latlng.lng, lat: e.latlng.lat, k: 50 }))
      .then(function (r) { return r.json(); })
      .then(function (body) {
        if (body.error) { state.hits = 0; hitsBox.innerHTML = "<span class='error'>" + body.error + "</span>"; }
        else { showHits(body); }
      });
  });

  fetch("/api/layers").then(function (r) { return r.json(); }).then(function (info) {
    document.getElementById("target").textContent = info.target;
    state.searchable = info.searchable;
    let bounds = null;
    info.layers.forEach(function (layer) {
      const leaf = layer.kind === "raster" ? addRaster(layer) : addVector(layer);
      state.layers[layer.id] = leaf;
      control.addOverlay(leaf, layer.title);
      if (layer.visible) { leaf.addTo(map); }
      if (layer.legend && layer.legend.length) { legends.push({ title: layer.title, entries: layer.legend }); }
      const b = L.latLngBounds([[layer.bounds[1], layer.bounds[0]], [layer.bounds[3], layer.bounds[2]]]);
      bounds = bounds ? bounds.extend(b) : b;
    });
    if (legends.length) { legend.addTo(map); }
    if (bounds) { map.fitBounds(bounds); } else { map.setView([0, 0], 2); }
    status.textContent = info.layers.length + " layers" + (info.searchable ? "; click the map to find similar patches" : "");
    state.ready = true;
  }).catch(function (err) {
    status.innerHTML = "<span class='error'>could not load layers: " + err + "</span>";
  });
})();
