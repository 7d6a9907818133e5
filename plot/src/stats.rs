//! The statistics behind the importance plot: Spearman's rank correlation and the correlation
//! ratio (eta).

/// Ranks of `xs` from 1, ties sharing the mean of the ranks they span.
pub(crate) fn ranks(xs: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    idx.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut out = vec![0.0; xs.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && xs[idx[j + 1]] == xs[idx[i]] {
            j += 1;
        }
        // Positions i..=j hold one value: each gets the mean of ranks i+1..=j+1.
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            out[k] = mean;
        }
        i = j + 1;
    }
    out
}

fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Spearman's rank correlation of `x` and `y` (the Pearson correlation of their ranks, ties
/// averaged), in [-1, 1]. `None` with fewer than 3 pairs or when either side is constant.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 3 {
        return None;
    }
    pearson(&ranks(x), &ranks(y))
}

/// The correlation ratio eta of `y` grouped by `levels`: sqrt(between-level sum of squares /
/// total sum of squares), in [0, 1]. 1 means the level alone fixes the value; 0 means every
/// level has the same mean. `None` with fewer than 3 values, one level, or constant `y`.
pub fn correlation_ratio(levels: &[String], y: &[f64]) -> Option<f64> {
    if levels.len() != y.len() || y.len() < 3 {
        return None;
    }
    let mean = y.iter().sum::<f64>() / y.len() as f64;
    let mut groups: std::collections::BTreeMap<&str, (f64, usize)> = Default::default();
    for (l, v) in levels.iter().zip(y) {
        let g = groups.entry(l.as_str()).or_default();
        g.0 += v;
        g.1 += 1;
    }
    if groups.len() < 2 {
        return None;
    }
    let total: f64 = y.iter().map(|v| (v - mean) * (v - mean)).sum();
    let between: f64 = groups
        .values()
        .map(|&(sum, n)| {
            let m = sum / n as f64;
            n as f64 * (m - mean) * (m - mean)
        })
        .sum();
    (total > 0.0).then(|| (between / total).sqrt().min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[10.0, 30.0, 20.0, 20.0]), vec![1.0, 4.0, 2.5, 2.5]);
    }

    #[test]
    fn spearman_on_a_hand_example() {
        // Monotone but not linear: rank correlation 1.
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 8.0, 27.0, 64.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]).unwrap() + 1.0).abs() < 1e-12);
        // x ranks 1..5, y ranks 2,1,4,3,5: d = -1,1,-1,1,0, sum d^2 = 4,
        // rho = 1 - 6*4/(5*24) = 0.8.
        let r = spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[20.0, 10.0, 40.0, 30.0, 50.0]).unwrap();
        assert!((r - 0.8).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(spearman(&[1.0, 2.0], &[1.0, 2.0]), None);
    }

    #[test]
    fn eta_on_a_hand_example() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Level alone decides the value: eta 1.
        let e = correlation_ratio(&l(&["a", "a", "b", "b"]), &[1.0, 1.0, 3.0, 3.0]).unwrap();
        assert!((e - 1.0).abs() < 1e-12);
        // Same means per level: eta 0.
        let e = correlation_ratio(&l(&["a", "a", "b", "b"]), &[1.0, 3.0, 1.0, 3.0]).unwrap();
        assert!(e.abs() < 1e-12);
        // a: 1, 2 (mean 1.5); b: 4; grand mean 7/3. Total sum of squares 16/9 + 1/9 + 25/9 =
        // 14/3; between levels 2 * (3/2 - 7/3)^2 + (4 - 7/3)^2 = 25/6; eta^2 = 25/28.
        let e = correlation_ratio(&l(&["a", "a", "b"]), &[1.0, 2.0, 4.0]).unwrap();
        assert!((e - (25.0f64 / 28.0).sqrt()).abs() < 1e-12, "{e}");
        assert_eq!(correlation_ratio(&l(&["a", "a", "a"]), &[1.0, 2.0, 3.0]), None);
    }
}
