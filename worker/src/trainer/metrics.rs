//! Classification metrics from predictions: confusion matrix, accuracy, per-class and macro F1.
//!
//! F1 of a class is 2TP / (2TP + FP + FN). A class that appears neither among the labels nor
//! among the predictions has no F1: it reports 0 and is left out of the macro average (what
//! scikit-learn's `f1_score(average="macro")` does when it is not told the label set).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    classes: usize,
    /// Row-major `classes x classes`: `counts[truth * classes + predicted]`.
    counts: Vec<u64>,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Confusion {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The counts, row-major: `counts[truth * classes + predicted]`.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// A matrix from its row-major counts (e.g. summed over the ranks of a data-parallel run).
    pub fn from_counts(classes: usize, counts: Vec<u64>) -> Self {
        assert_eq!(
            counts.len(),
            classes * classes,
            "a confusion matrix has classes^2 counts"
        );
        Confusion { classes, counts }
    }

    /// Counts one prediction; both must be below `classes`.
    pub fn add(&mut self, truth: usize, predicted: usize) {
        assert!(
            truth < self.classes && predicted < self.classes,
            "class index out of range"
        );
        self.counts[truth * self.classes + predicted] += 1;
    }

    pub fn get(&self, truth: usize, predicted: usize) -> u64 {
        self.counts[truth * self.classes + predicted]
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Rows are true classes, columns predicted ones.
    pub fn rows(&self) -> Vec<Vec<u64>> {
        self.counts.chunks(self.classes.max(1)).map(<[u64]>::to_vec).collect()
    }

    /// Share of correct predictions; 0 with none.
    pub fn accuracy(&self) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        let correct: u64 = (0..self.classes).map(|c| self.get(c, c)).sum();
        correct as f64 / total as f64
    }

    /// F1 of each class, `None` where the class is neither a label nor a prediction.
    fn f1s(&self) -> Vec<Option<f64>> {
        (0..self.classes)
            .map(|c| {
                let tp = self.get(c, c);
                let support: u64 = (0..self.classes).map(|p| self.get(c, p)).sum();
                let predicted: u64 = (0..self.classes).map(|t| self.get(t, c)).sum();
                let (fn_, fp) = (support - tp, predicted - tp);
                let denominator = 2 * tp + fp + fn_;
                (denominator > 0).then(|| 2.0 * tp as f64 / denominator as f64)
            })
            .collect()
    }

    pub fn per_class_f1(&self) -> Vec<f64> {
        self.f1s().into_iter().map(|f| f.unwrap_or(0.0)).collect()
    }

    /// Mean F1 over the classes seen as labels or predictions; 0 with none.
    pub fn macro_f1(&self) -> f64 {
        let seen: Vec<f64> = self.f1s().into_iter().flatten().collect();
        if seen.is_empty() {
            0.0
        } else {
            seen.iter().sum::<f64>() / seen.len() as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_pairs(classes: usize, pairs: &[(usize, usize)]) -> Confusion {
        let mut c = Confusion::new(classes);
        for &(t, p) in pairs {
            c.add(t, p);
        }
        c
    }

    #[test]
    fn perfect_predictions() {
        let c = from_pairs(3, &[(0, 0), (1, 1), (2, 2), (2, 2)]);
        assert_eq!(c.accuracy(), 1.0);
        assert_eq!(c.per_class_f1(), [1.0, 1.0, 1.0]);
        assert_eq!(c.macro_f1(), 1.0);
        assert_eq!(c.rows(), [vec![1, 0, 0], vec![0, 1, 0], vec![0, 0, 2]]);
    }

    #[test]
    fn matches_a_hand_computed_example() {
        // truth:     0 0 0 1 1 2
        // predicted: 0 0 1 1 2 2
        let c = from_pairs(3, &[(0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (2, 2)]);
        assert!((c.accuracy() - 4.0 / 6.0).abs() < 1e-12);
        // class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 2/4; class 2: tp 1 fp 1 fn 0 -> 2/3
        let f1 = c.per_class_f1();
        let expected = [0.8, 0.5, 2.0 / 3.0];
        for (got, want) in f1.iter().zip(expected) {
            assert!((got - want).abs() < 1e-12, "{f1:?}");
        }
        assert!((c.macro_f1() - (0.8 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert_eq!(c.get(0, 1), 1);
        assert_eq!(c.get(1, 0), 0);
    }

    #[test]
    fn unseen_classes_stay_out_of_the_macro_average() {
        // Class 2 is never a label nor a prediction; class 1 is predicted but never true.
        let c = from_pairs(3, &[(0, 0), (0, 1)]);
        assert_eq!(c.per_class_f1(), [2.0 / 3.0, 0.0, 0.0]);
        assert!((c.macro_f1() - (2.0 / 3.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn empty_matrix_reports_zeros() {
        let c = Confusion::new(7);
        assert_eq!(c.accuracy(), 0.0);
        assert_eq!(c.macro_f1(), 0.0);
        assert_eq!(c.per_class_f1(), vec![0.0; 7]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn refuses_classes_beyond_the_matrix() {
        Confusion::new(2).add(2, 0);
    }
}
