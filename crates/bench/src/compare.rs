//! Side-by-side table of two reports: figure, A, B, ratio A/B.

use crate::report::{Report, fmt_value};

/// One row of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Figure name.
    pub name: String,
    /// Unit.
    pub unit: String,
    /// Value in report A, if it has the figure.
    pub a: Option<f64>,
    /// Value in report B.
    pub b: Option<f64>,
}

impl Row {
    /// A / B, when both exist and B is not zero.
    pub fn ratio(&self) -> Option<f64> {
        match (self.a, self.b) {
            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
            _ => None,
        }
    }
}

/// The union of both reports' figures: A's order first, then what only B has.
pub fn rows(a: &Report, b: &Report) -> Vec<Row> {
    let mut out: Vec<Row> = a
        .figures
        .iter()
        .map(|f| Row { name: f.name.clone(), unit: f.unit.clone(), a: Some(f.value), b: None })
        .collect();
    for f in &b.figures {
        match out.iter_mut().find(|r| r.name == f.name) {
            Some(r) => r.b = Some(f.value),
            None => out.push(Row {
                name: f.name.clone(),
                unit: f.unit.clone(),
                a: None,
                b: Some(f.value),
            }),
        }
    }
    out
}

fn cell(v: Option<f64>) -> String {
    v.map(fmt_value).unwrap_or_else(|| "-".into())
}

/// Renders the table, as Markdown or as aligned text.
pub fn render(a: &Report, b: &Report, markdown: bool) -> String {
    let rows = rows(a, b);
    let ratio_head = format!("{}/{}", a.runtime, b.runtime);
    let mut s = String::new();
    if markdown {
        s += &format!(
            "| figure | unit | {} | {} | {ratio_head} |\n|---|---|--:|--:|--:|\n",
            a.runtime, b.runtime
        );
        for r in &rows {
            let ratio = r.ratio().map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
            s +=
                &format!("| {} | {} | {} | {} | {ratio} |\n", r.name, r.unit, cell(r.a), cell(r.b));
        }
    } else {
        let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
        let cw = a.runtime.len().max(b.runtime.len()).max(10);
        s += &format!(
            "{:<w$}  {:>cw$}  {:>cw$}  {:>10}  unit\n",
            "figure", a.runtime, b.runtime, ratio_head
        );
        for r in &rows {
            let ratio = r.ratio().map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
            s += &format!(
                "{:<w$}  {:>cw$}  {:>cw$}  {:>10}  {}\n",
                r.name,
                cell(r.a),
                cell(r.b),
                ratio,
                r.unit
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_and_ratio() {
        let mut a = Report::new("berth");
        a.push("x", 2.0, "ms");
        a.push("only-a", 1.0, "ms");
        let mut b = Report::new("containerd");
        b.push("x", 4.0, "ms");
        b.push("only-b", 0.0, "ms");
        let r = rows(&a, &b);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].ratio(), Some(0.5));
        assert_eq!(r[1].ratio(), None);
        assert_eq!(r[2].a, None);
        let md = render(&a, &b, true);
        assert!(md.contains("| x | ms | 2 | 4 | 0.50 |"), "{md}");
        assert!(render(&a, &b, false).contains("berth/containerd"));
    }
}
