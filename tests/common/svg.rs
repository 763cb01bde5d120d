//! Checks of the SVG plots of src/plot.rs (plotters' SVG backend writes one element
//! per line: `<text ...>` with its text on the next line, `<rect .../>`,
//! `<polyline ... points="x,y x,y "/>`): the document, its title, axis descriptions
//! and tick labels, and the drawn data.
use std::path::Path;

/// A plot read back: the document and its elements.
pub struct Svg {
    pub path: String,
    pub doc: String,
}

/// One opening tag: its name and attributes.
pub struct Element {
    pub tag: String,
    pub attrs: Vec<(String, String)>,
    /// The text of a `<text>` element (trimmed).
    pub text: String,
}

impl Element {
    pub fn attr(&self, name: &str) -> &str {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("<{}> without {name}", self.tag))
    }

    pub fn num(&self, name: &str) -> f64 {
        self.attr(name)
            .parse()
            .unwrap_or_else(|_| panic!("<{}> {name}={:?}", self.tag, self.attr(name)))
    }

    /// The points of a `<polyline>`.
    pub fn points(&self) -> Vec<(f64, f64)> {
        self.attr("points")
            .split_whitespace()
            .map(|p| {
                let (x, y) = p.split_once(',').expect("x,y");
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }
}

impl Svg {
    /// Reads `path` and checks that it is one `<svg>` element whose tags are
    /// balanced (every `<text>` closed).
    pub fn read(path: &Path) -> Svg {
        let doc =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let svg = Svg {
            path: path.display().to_string(),
            doc,
        };
        let t = svg.doc.trim();
        assert!(
            t.starts_with("<svg ") && t.ends_with("</svg>"),
            "{}: not an <svg> document",
            svg.path
        );
        for tag in ["svg", "text"] {
            assert_eq!(
                t.matches(&format!("<{tag} ")).count(),
                t.matches(&format!("</{tag}>")).count(),
                "{}: unbalanced <{tag}>",
                svg.path
            );
        }
        svg
    }

    /// The elements named `tag`, in document order.
    pub fn elements(&self, tag: &str) -> Vec<Element> {
        let open = format!("<{tag} ");
        let mut out = Vec::new();
        let mut rest = self.doc.as_str();
        while let Some(i) = rest.find(&open) {
            rest = &rest[i + open.len()..];
            let end = rest.find('>').expect("a closed tag");
            let (head, after) = (&rest[..end], &rest[end + 1..]);
            let mut attrs = Vec::new();
            let mut h = head.trim_end_matches('/').trim();
            while let Some(eq) = h.find("=\"") {
                let key = h[..eq].trim().to_string();
                let v = &h[eq + 2..];
                let close = v.find('"').expect("a quoted value");
                attrs.push((key, unescape(&v[..close])));
                h = v[close + 1..].trim_start();
            }
            let text = if tag == "text" {
                let close = after.find("</text>").expect("</text>");
                unescape(after[..close].trim())
            } else {
                String::new()
            };
            out.push(Element {
                tag: tag.to_string(),
                attrs,
                text,
            });
        }
        out
    }

    /// The texts of the `<text>` elements.
    pub fn texts(&self) -> Vec<String> {
        self.elements("text").into_iter().map(|e| e.text).collect()
    }

    /// Asserts that `want` is one of the texts.
    pub fn assert_text(&self, want: &str) {
        let texts = self.texts();
        assert!(
            texts.iter().any(|t| t == want),
            "{}: no text {want:?} in {texts:?}",
            self.path
        );
    }

    /// The numbers of the tick labels along the x axis (centred under it) and the
    /// y axis (right-aligned beside it).
    pub fn ticks(&self) -> (Vec<f64>, Vec<f64>) {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for e in self.elements("text") {
            if let Ok(v) = e.text.parse::<f64>() {
                match e.attr("text-anchor") {
                    "middle" => x.push(v),
                    "end" => y.push(v),
                    _ => {}
                }
            }
        }
        (x, y)
    }

    /// The filled `<rect>`s of colour `fill` (`#RRGGBB`) and opacity `opacity`.
    pub fn rects(&self, fill: &str, opacity: &str) -> Vec<Element> {
        self.elements("rect")
            .into_iter()
            .filter(|r| r.attr("fill") == fill && r.attr("opacity") == opacity)
            .collect()
    }

    /// The `<polyline>`s of colour `stroke`, opacity `opacity` and width `width`.
    pub fn lines(&self, stroke: &str, opacity: &str, width: &str) -> Vec<Element> {
        self.elements("polyline")
            .into_iter()
            .filter(|l| {
                l.attr("stroke") == stroke
                    && l.attr("opacity") == opacity
                    && l.attr("stroke-width") == width
            })
            .collect()
    }
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The x range of a histogram of `id` and `ood`: their finite range (widened to 1
/// when it is a point), as src/plot.rs takes it.
fn score_range(id: &[f64], ood: &[f64]) -> (f64, f64) {
    let finite = || id.iter().chain(ood).filter(|v| v.is_finite());
    let lo = finite().cloned().fold(f64::INFINITY, f64::min);
    let hi = finite().cloned().fold(f64::NEG_INFINITY, f64::max);
    if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

/// The bins (of 50 equal bins over the finite range of both sets, as
/// src/plot.rs bins them) that hold at least one of `values`.
fn occupied_bins(values: &[f64], id: &[f64], ood: &[f64]) -> usize {
    let (lo, hi) = score_range(id, ood);
    let width = (hi - lo) / 50.0;
    let mut bins: Vec<usize> = values
        .iter()
        .filter(|v| v.is_finite())
        .map(|v| (((v - lo) / width) as usize).min(49))
        .collect();
    bins.sort();
    bins.dedup();
    bins.len()
}

/// Checks the histogram `mos::plot::histogram` drew of the scores `id` and `ood`
/// with `title`: the title, both axis descriptions, tick labels (scores within the
/// sets' range on x, fractions from 0 on y),
/// the legend names of both sets, and per set 50 bars (blue for ID, red for OOD)
/// of which those of the bins holding its scores are drawn with a height.
pub fn assert_histogram(path: &Path, title: &str, id: &[f64], ood: &[f64]) {
    let svg = Svg::read(path);
    for t in [
        title,
        "score (higher = more in-distribution)",
        "fraction of images",
        "in-distribution",
        "out-of-distribution",
    ] {
        svg.assert_text(t);
    }
    let (x, y) = svg.ticks();
    // x: scores within the range of both sets; y: fractions from 0.
    let (lo, hi) = score_range(id, ood);
    assert!(x.len() >= 2, "{}: x ticks {x:?}", svg.path);
    assert!(
        x.iter().all(|v| (lo..=hi).contains(v)),
        "{}: x ticks {x:?} outside the scores' range [{lo}, {hi}]",
        svg.path
    );
    assert!(
        y.len() >= 2 && y.contains(&0.0),
        "{}: y ticks {y:?}",
        svg.path
    );
    assert!(
        y.iter().all(|v| (0.0..=1.1).contains(v)),
        "{}: {y:?}",
        svg.path
    );
    for (fill, values, what) in [("#0000FF", id, "ID"), ("#FF0000", ood, "OOD")] {
        let bars = svg.rects(fill, "0.35");
        let drawn = bars.iter().filter(|r| r.num("height").abs() > 0.0).count();
        let want = occupied_bins(values, id, ood);
        assert!(want > 0, "{what}: no finite score");
        assert!(bars.len() <= 50, "{}: {} {what} bars", svg.path, bars.len());
        assert_eq!(drawn, want, "{}: {what} bars with a height", svg.path);
    }
}

/// Checks the ROC plot `mos::plot::roc` drew of the scores `id` and `ood` with
/// `title`: the title, both axis descriptions, ticks from 0 to 1 on both axes,
/// the diagonal, and the curve: one point per point of
/// `mos::plot::roc_points(id, ood)`, from the diagonal's start to its end, moving
/// only right and up.
pub fn assert_roc(path: &Path, title: &str, id: &[f64], ood: &[f64]) {
    let svg = Svg::read(path);
    for t in [
        title,
        "false positive rate (OOD accepted)",
        "true positive rate (ID accepted)",
    ] {
        svg.assert_text(t);
    }
    let (x, y) = svg.ticks();
    // Both axes are rates from 0 to 1.
    for ticks in [&x, &y] {
        assert!(
            ticks.contains(&0.0) && ticks.contains(&1.0),
            "{}: ticks {ticks:?}",
            svg.path
        );
        assert!(
            ticks.iter().all(|v| (0.0..=1.0).contains(v)),
            "{}: ticks {ticks:?}",
            svg.path
        );
    }
    // The diagonal is black at opacity 0.3 (the mesh's lines are at 0.2 and 0.1).
    let diagonal = svg.lines("#000000", "0.3", "1");
    assert_eq!(diagonal.len(), 1, "{}: the diagonal", svg.path);
    let diagonal = diagonal[0].points();
    let curve = svg.lines("#0000FF", "1", "2");
    assert_eq!(curve.len(), 1, "{}: the curve", svg.path);
    let curve = curve[0].points();
    assert_eq!(
        curve.len(),
        mos::plot::roc_points(id, ood).len(),
        "{}: {curve:?}",
        svg.path
    );
    assert_eq!(curve.first(), diagonal.first(), "{}", svg.path);
    assert_eq!(curve.last(), diagonal.last(), "{}", svg.path);
    // SVG's y grows downwards: up the plot is a smaller y.
    for w in curve.windows(2) {
        assert!(
            w[1].0 >= w[0].0 && w[1].1 <= w[0].1,
            "{}: {curve:?}",
            svg.path
        );
    }
}
