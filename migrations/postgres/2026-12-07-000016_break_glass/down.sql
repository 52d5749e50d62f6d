DROP TABLE break_glass_uses;
